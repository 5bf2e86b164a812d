package test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// The shim's trust boundary on a real node: a sidecar whose node name is
// not in allowed_sidecars is refused (and told why) until the operator
// allows it; once attached, messages to its session that do not carry the
// session's token (bare version 1 messages, a guessed token) are ignored,
// counted and logged once per reason, and run nothing; the sidecar's own
// clients chat on.
func TestTrustBoundaryAllowlistAndToken(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	eval(t, ej, `application:set_env(megaphone, allowed_sidecars, [<<"megaphone_edge_*@localhost">>])`)
	sc := spawnSidecar(t, ej, "")
	waitUntil(t, 20*time.Second, "the sidecar told it is refused", func() bool {
		return strings.Contains(sc.logs(), "not in allowed_sidecars")
	})
	select {
	case <-sc.attached:
		t.Fatalf("a sidecar outside allowed_sidecars attached:\n%s", sc.logs())
	default:
	}
	if out := eval(t, ej, `maps:get(sidecars, megaphone:status())`); out != "[]" {
		t.Errorf("a refused sidecar has a session: %s", out)
	}
	waitUntil(t, 10*time.Second, "the refusal in ejabberd's log", func() bool {
		return strings.Contains(readFile(t, ej.LogFile), "refused a hello from")
	})

	eval(t, ej, `application:set_env(megaphone, allowed_sidecars, ["megaphone_edge_*@localhost", "megaphone_e2e_*@localhost"])`)
	sc.waitAttached(t, 20*time.Second)

	// Forgeries from a process on the node (anything that is not the
	// sidecar): 50 bare requests, as a version 1 sidecar would send them,
	// and 50 with a guessed token.
	session := `hd(gen_server:call(megaphone_listener, sessions))`
	eval(t, ej, `S = `+session+`, Req = {bosh_request, 1, 1, {{127,0,0,1}, 1}, <<"<body rid='1' xmlns='http://jabber.org/protocol/httpbind'/>">>},
	    [S ! M || _ <- lists:seq(1, 50), M <- [Req, {from_sidecar, crypto:strong_rand_bytes(16), Req}]], ok`)
	waitUntil(t, 10*time.Second, "100 forgeries ignored", func() bool {
		return eval(t, ej, `maps:get(ignored, megaphone_sidecar:status(`+session+`))`) == "100"
	})
	if n := eval(t, ej, `maps:get(requests, megaphone_sidecar:status(`+session+`))`); n != "0" {
		t.Errorf("forged requests ran: requests = %s", n)
	}
	log := readFile(t, ej.LogFile)
	for _, why := range []string{"without the token its protocol version requires", "its token is not this session's"} {
		if n := strings.Count(log, why); n != 1 {
			t.Errorf("%d log lines %q for 50 such messages, want 1 (capped)", n, why)
		}
	}

	res := startClient(t, sc.url(), "--mode", "chat", "--count", "10", "--timeout", "60").wait(t, 90*time.Second)
	if res.Received["a"] != 10 || res.Received["b"] != 10 {
		t.Errorf("received %v through the allowed sidecar, want 10 each", res.Received)
	}
	if n := eval(t, ej, `maps:get(requests, megaphone_sidecar:status(`+session+`)) > 0`); n != "true" {
		t.Errorf("the sidecar's own requests did not reach its session")
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
