package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// One sidecar in front of a two-node ejabberd cluster: 200 BOSH sessions
// are spread over both nodes; when one node stops, its sessions end with a
// BOSH terminate (no client hangs) and the other node's sessions go on
// working; when it comes back, new sessions land on it again.
func TestClusterSpreadsSessionsAndSurvivesANodeDown(t *testing.T) {
	const users = 200
	ej1 := startEjabberd(t, harness.Options{Name: "clu1", KeepDir: true})
	t.Cleanup(func() { os.RemoveAll(ej1.Dir) })
	cookie, err := os.ReadFile(ej1.CookieFile)
	if err != nil {
		t.Fatal(err)
	}
	ej2 := startEjabberd(t, harness.Options{Name: "clu2", Cookie: string(cookie)})
	if out := eval(t, ej2, fmt.Sprintf("ejabberd_admin:join_cluster(<<%q>>)", ej1.Node)); out != "ok" {
		t.Fatalf("join_cluster: %s", out)
	}
	waitUntil(t, 30*time.Second, "two-node cluster", func() bool {
		return evalInt(t, ej1, "length(ejabberd_cluster:get_nodes())") == 2
	})
	// One rpc loop registers everyone (replicated cluster-wide).
	eval(t, ej1, fmt.Sprintf(`[ejabberd_auth:try_register(<<"user", (integer_to_binary(I))/binary>>,
	    <<"localhost">>, <<%q>>) || I <- lists:seq(1, %d)], ok`, demoPassword, users))

	sc := startSidecar(t, ej1, "", "--node", ej2.Node)
	waitUntil(t, 20*time.Second, "sidecar attached to both nodes", func() bool {
		return strings.Count(sc.logs(), "attached to the shim") >= 2
	})

	swarm := startSwarm(t, sc.url(), "--users", fmt.Sprint(users), "--duration", "25", "--interval-ms", "1000",
		"--concurrency", "20", "--timeout", "240")
	if got := swarm.waitReady(t); got["logged_in"] != users {
		t.Fatalf("logged in %v of %d", got["logged_in"], users)
	}
	local := "length(ejabberd_sm:dirty_get_my_sessions_list())"
	on1, on2 := evalInt(t, ej1, local), evalInt(t, ej2, local)
	t.Logf("sessions: %d on %s, %d on %s", on1, ej1.Node, on2, ej2.Node)
	if on1+on2 != users || on1 < users/4 || on2 < users/4 {
		t.Fatalf("sessions not spread over the cluster: %d and %d", on1, on2)
	}

	time.Sleep(3 * time.Second)
	if err := ej1.Stop(); err != nil {
		t.Fatal(err)
	}
	res := swarm.wait(t, 3*time.Minute)
	t.Logf("after stopping %s: %+v", ej1.Node, res)
	terminated := 0
	for _, n := range res.Terminated {
		terminated += n
	}
	if res.Hung != 0 || res.Alive != on2 || terminated != on1 || res.OutOfOrder != 0 {
		t.Errorf("want %d alive, %d terminated, none hung or out of order; got %+v", on2, on1, res)
	}

	// The stopped node comes back (same name and spool, so it rejoins the
	// cluster); the operator loads the shim again; the sidecar re-attaches
	// on its own and new sessions land there again.
	back, err := harness.Start(context.Background(), harness.Options{Dir: ej1.Dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = back.Stop() })
	if out, err := back.LoadShim(context.Background(), shimEbin); err != nil {
		t.Fatalf("reloading the shim: %v\n%s", err, out)
	}
	waitUntil(t, 30*time.Second, "sidecar re-attached to the restarted node", func() bool {
		return strings.Count(sc.logs(), "attached to the shim") >= 3
	})
	again := startSwarm(t, sc.url(), "--users", "20", "--duration", "4", "--interval-ms", "500", "--timeout", "60")
	again.waitReady(t)
	if n := evalInt(t, back, local); n == 0 {
		t.Errorf("no new session landed on the restarted node %s", back.Node)
	}
	if res := again.wait(t, time.Minute); res.Alive != 20 {
		t.Errorf("after the restart: %+v", res)
	}
}

// swarmResult is the JSON line test/clients/bosh_swarm.mjs prints.
type swarmResult struct {
	OK         bool           `json:"ok"`
	States     map[string]int `json:"states"`
	Error      string         `json:"error"`
	LoggedIn   int            `json:"logged_in"`
	Alive      int            `json:"alive"`
	Hung       int            `json:"hung"`
	Terminated map[string]int `json:"terminated"`
	OutOfOrder int            `json:"out_of_order"`
	// ArrivalOutOfOrder is informative: Strophe's processing order, not
	// the server's (bosh_swarm.mjs).
	ArrivalOutOfOrder int `json:"arrival_out_of_order"`
	Sent              int `json:"sent"`
	Received          int `json:"received"`
}

// startSwarm runs many real Strophe.js BOSH sessions (user1..userN).
func startSwarm(t *testing.T, url string, args ...string) *swarm {
	t.Helper()
	return &swarm{startNodeClient(t, append([]string{"bosh_swarm.mjs", "--url", url, "--password", demoPassword}, args...)...)}
}

type swarm struct{ *nodeClient }

// waitReady returns the swarm's login counts.
func (c *swarm) waitReady(t *testing.T) map[string]int {
	t.Helper()
	var counts map[string]int
	if err := json.Unmarshal([]byte(c.nodeClient.waitReady(t)), &counts); err != nil {
		t.Fatalf("READY line: %v", err)
	}
	return counts
}

func (c *swarm) wait(t *testing.T, limit time.Duration) swarmResult {
	t.Helper()
	var res swarmResult
	if !c.finished(t, limit, &res) {
		t.Fatalf("swarm did not finish within %s\n%s", limit, tail(c.stderr.String(), 40))
	}
	if !res.OK {
		t.Fatalf("swarm failed: %s\n%s", res.Error, tail(c.stderr.String(), 40))
	}
	return res
}
