package test

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// A new sidecar binary takes over from the running one while real clients
// chat through it: @xmpp/client pairs over plain XMPP/TCP and over
// WebSocket, and a Strophe.js pair over BOSH, each sending a message every
// 100 ms before, during and after the upgrade. Every client must finish
// with every message delivered once and in order and no disconnect (the
// clients fail at once on one); ejabberd must never see the sidecar's node
// go down (a watcher on the node records every nodedown), and the c2s
// processes of the TCP sessions must be the same processes after the
// upgrade; the old process must exit once what it kept has ended; and new
// clients must log in through the new process.
func TestHotUpgradeKeepsClients(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, user := range []string{"carol", "dave", "erin", "frank"} {
		if err := ej.Register(ctx, user, "localhost", demoPassword); err != nil {
			t.Fatal(err)
		}
	}
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	c2s := fmt.Sprintf("127.0.0.1:%d", port)
	handoff := filepath.Join(t.TempDir(), "handoff.sock")
	// No certificate: the c2s listener serves plain XMPP, which can move.
	flags := []string{"--c2s-addr", c2s, "--admin-addr", "", "--handoff-socket", handoff}
	old := startSidecar(t, ej, "", flags...)

	// ejabberd's side: a process that records every node going down.
	eval(t, ej, `Watch = fun Loop(Events) ->
	        receive
	            {nodedown, N, _} -> Loop([N | Events]);
	            {get, From} -> From ! {downs, Events}, Loop(Events);
	            _ -> Loop(Events)
	        end
	    end,
	    Pid = spawn(fun() -> ok = net_kernel:monitor_nodes(true, [{node_type, all}]), Watch([]) end),
	    register(megaphone_upgrade_watch, Pid), ok`)

	const duration = 24 // seconds of sending, 10 a second
	live := []string{"--mode", "live", "--duration", fmt.Sprint(duration), "--interval-ms", "100", "--settle", "5", "--timeout", "90"}
	tcp := startNodeClient(t, append([]string{"xmpp_chat.mjs", "--service", "xmpp://" + c2s, "--domain", "localhost",
		"--a", "alice", "--b", "bob", "--password", demoPassword}, live...)...)
	ws := startNodeClient(t, append([]string{"xmpp_chat.mjs", "--service", "ws://" + old.addr + "/ws", "--domain", "localhost",
		"--a", "carol", "--b", "dave", "--password", demoPassword}, live...)...)
	bosh := startNodeClient(t, append([]string{"bosh_chat.mjs", "--url", old.url(), "--a", "erin@localhost",
		"--b", "frank@localhost", "--password", demoPassword}, live...)...)
	for _, c := range []*nodeClient{tcp, ws, bosh} {
		c.waitReady(t)
	}
	const sessionsExpr = `lists:sort([{U, R, ejabberd_sm:get_session_pid(U, S, R)} || {U, S, R} <- ejabberd_sm:dirty_get_sessions_list()])`
	before := eval(t, ej, sessionsExpr)
	users := []string{"alice", "bob", "carol", "dave", "erin", "frank"}
	pidsBefore := c2sPids(before, users...)
	if len(pidsBefore) != len(users) {
		t.Fatalf("want one c2s for each of %v before the upgrade, sessions: %s", users, before)
	}
	time.Sleep(4 * time.Second) // chatting through the old process

	upgraded := startSidecar(t, ej, old.addr, append([]string{"--takeover", handoff}, flags...)...)
	upgraded.name = old.name
	if !strings.Contains(upgraded.logs(), "took over the running sidecar's node") {
		t.Fatalf("the new process did not take over:\n%s", upgraded.logs())
	}
	time.Sleep(4 * time.Second) // chatting through the new process
	if during := c2sPids(eval(t, ej, sessionsExpr), users...); strings.Join(during, " ") != strings.Join(pidsBefore, " ") {
		t.Errorf("c2s processes changed across the upgrade: before %v, after %v", pidsBefore, during)
	}

	for name, c := range map[string]*nodeClient{"tcp": tcp, "websocket": ws, "bosh": bosh} {
		res := c.wait(t, 2*time.Minute) // fails the test on any disconnect or loss
		want := duration * 10
		if res.Sent["a"] < want-2 || res.Received["b"] != res.Sent["a"] {
			t.Errorf("%s: sent %v, received %v", name, res.Sent, res.Received)
		}
	}

	downs := eval(t, ej, `megaphone_upgrade_watch ! {get, self()}, receive {downs, D} -> D after 5000 -> timeout end`)
	// The watcher does see hidden nodes go: each eval's probe node is one.
	if !strings.Contains(downs, "probe_") || strings.Contains(downs, old.name) {
		t.Errorf("ejabberd saw the sidecar's node go down during the upgrade (or the watcher saw nothing): %s", downs)
	}
	select {
	case <-old.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("the old process did not exit once empty:\n%s", tail(old.logs(), 30))
	}
	// The TCP and WebSocket streams (two each) moved; nothing stayed behind.
	if !strings.Contains(old.logs(), `"streams_moved": 4, "streams_staying": 0`) {
		t.Errorf("the old process did not hand over the four streams:\n%s", tail(old.logs(), 30))
	}

	// New logins go through the new process, on the same ports.
	res := xmppChat(t, "xmpp://"+c2s, "--count", "100", "--timeout", "60").wait(t, 90*time.Second)
	if res.Received["a"] != 100 || res.Received["b"] != 100 {
		t.Errorf("after the upgrade: received %v", res.Received)
	}
	if hidden := eval(t, ej, "nodes(hidden)"); !strings.Contains(hidden, old.name) {
		t.Errorf("the sidecar's node is not connected after the upgrade: %s", hidden)
	}
}

// c2sPids picks the c2s pids of the given users out of a printed session
// list ({User, Resource, Pid} tuples), sorted.
func c2sPids(sessions string, users ...string) []string {
	var out []string
	for _, u := range users {
		re := regexp.MustCompile(`\{<<"` + u + `">>,\s*<<"[^"]*">>,\s*(<[0-9.]+>)\}`)
		for _, m := range re.FindAllStringSubmatch(sessions, -1) {
			out = append(out, m[1])
		}
	}
	sort.Strings(out)
	return out
}
