package test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// A new sidecar binary takes over from the running one while real clients
// chat through it: @xmpp/client pairs over plain XMPP/TCP and over
// WebSocket, and a Strophe.js pair over BOSH, each sending a message every
// 100 ms before, during and after the upgrade. The TCP and WebSocket
// streams move to the new process (their sockets and c2s pids with them);
// the old process exits once the BOSH requests it held are answered.
// On the host's ejabberd, 100 more Strophe.js BOSH sessions meanwhile each
// send a message to themselves every 500 ms (about 200 messages a second)
// until the upgrade is over, so the takeover finds many long-polls held,
// requests read but not sent and answers in flight; each session's
// requests must reach ejabberd in rid order across the two processes, or
// sessions stall or end. (Not on 24.12: there this swarm loses sessions to
// other-request terminates through a sidecar that is never upgraded, too.)
// Before that, two takeovers fail (a binary of another handoff version,
// and one that goes away after the old process has paused everything and
// sent its state): the old process carries on, and the clients notice
// nothing of either.
func TestHotUpgradeKeepsClients(t *testing.T) { forEachTarget(t, testHotUpgradeKeepsClients) }

func testHotUpgradeKeepsClients(t *testing.T, tg target) {
	u := newUpgradeRun(t, tg, false)
	const users = 100
	var crowd *swarm
	if tg.Name == hostTarget.Name {
		eval(t, u.ej, fmt.Sprintf(`[ejabberd_auth:try_register(<<"user", (integer_to_binary(I))/binary>>,
		    <<"localhost">>, <<%q>>) || I <- lists:seq(1, %d)], ok`, demoPassword, users))
		// It sends until told to stop (SIGUSR2, below), so that it spans
		// the upgrade however slowly the clients start; --duration is a cap.
		crowd = startSwarm(t, "http://"+u.http+"/bosh", "--users", fmt.Sprint(users), "--duration", "200",
			"--interval-ms", "500", "--concurrency", "20", "--timeout", "240")
		if got := crowd.waitReady(t); got["logged_in"] != users {
			t.Fatalf("logged in %v of %d", got["logged_in"], users)
		}
	}
	u.clients(map[string][]string{
		"tcp":       {"xmpp_chat.mjs", "--service", "xmpp://" + u.c2s, "--domain", "localhost", "--a", "alice", "--b", "bob"},
		"websocket": {"xmpp_chat.mjs", "--service", "ws://" + u.http + "/ws", "--domain", "localhost", "--a", "carol", "--b", "dave"},
		"bosh":      {"bosh_chat.mjs", "--url", "http://" + u.http + "/bosh", "--a", "erin@localhost", "--b", "frank@localhost"},
	})
	u.failedTakeovers()
	u.upgrade()
	// The TCP and WebSocket streams (two each) moved; nothing stayed behind.
	if !strings.Contains(u.old.logs(), `"streams_moved": 4, "streams_staying": 0`) {
		t.Errorf("the old process did not hand over the four streams:\n%s", tail(u.old.logs(), 30))
	}
	u.finish()
	if crowd != nil {
		_ = crowd.cmd.Process.Signal(syscall.SIGUSR2)
		sw := crowd.wait(t, 2*time.Minute)
		t.Logf("BOSH swarm: %d sent, %d received, %d processed by Strophe out of the server's order",
			sw.Sent, sw.Received, sw.ArrivalOutOfOrder)
		if sw.Alive != users || sw.Hung != 0 || len(sw.Terminated) != 0 || sw.OutOfOrder != 0 || sw.Received != sw.Sent {
			t.Errorf("BOSH swarm across the upgrade: %+v\n%s", sw, tail(crowd.stderr.String(), 40))
		}
	}
	res := xmppChat(t, "xmpp://"+u.c2s, "--count", "100", "--timeout", "60").wait(t, 90*time.Second)
	if res.Received["a"] != 100 || res.Received["b"] != 100 {
		t.Errorf("after the upgrade: received %v", res.Received)
	}
}

// TLS streams cannot move (Go cannot export a live TLS session): they stay
// in the old process, whose link to ejabberd relays through the new one
// until they end. Clients over STARTTLS and direct TLS chat across the
// upgrade without noticing, while a WebSocket pair moves; new TLS clients
// log in through the new process. The upgrade is the operator's: SIGUSR2
// makes the running sidecar start its binary again as its successor. Then
// a third process takes over from the second while the first still relays
// through it: the second stays until the first has ended, then goes.
func TestHotUpgradeRelaysTLSStreams(t *testing.T) {
	u := newUpgradeRun(t, hostTarget, true)
	u.clients(map[string][]string{
		"starttls":   {"xmpp_chat.mjs", "--service", "xmpp://" + u.c2s, "--domain", "localhost", "--a", "alice", "--b", "bob", "--insecure", "--starttls", "required"},
		"direct-tls": {"xmpp_chat.mjs", "--service", "xmpps://" + u.c2sTLS, "--domain", "localhost", "--a", "carol", "--b", "dave", "--insecure"},
		"websocket":  {"xmpp_chat.mjs", "--service", "ws://" + u.http + "/ws", "--domain", "localhost", "--a", "erin", "--b", "frank"},
	})
	u.upgradeBySignal()
	if !strings.Contains(u.old.logs(), `"streams_moved": 2, "streams_staying": 0`) {
		t.Errorf("the old process did not hand over the WebSocket pair alone:\n%s", tail(u.old.logs(), 30))
	}
	if !strings.Contains(u.old.logs(), `connections still here	{"open": 4`) {
		t.Errorf("the old process did not keep the four TLS streams:\n%s", tail(u.old.logs(), 30))
	}
	third := startSidecar(t, u.ej, u.http, append([]string{"--takeover", u.handoff}, u.flags...)...)
	if !strings.Contains(third.logs(), `took over: running	{"streams": 2`) {
		t.Errorf("the third process did not take the WebSocket pair over:\n%s", third.logs())
	}
	u.checkPidsKept()
	u.finish()
	waitUntil(t, 30*time.Second, "the second process ends after the first", func() bool { return processGone(u.successor) })
	if !strings.Contains(third.logs(), "the old sidecar process has ended") {
		t.Errorf("the third process did not see the second end:\n%s", third.logs())
	}
	res := xmppChat(t, "xmpps://"+u.c2sTLS, "--count", "100", "--timeout", "60").wait(t, 90*time.Second)
	if res.Received["a"] != 100 || res.Received["b"] != 100 {
		t.Errorf("after the upgrade: received %v", res.Received)
	}
}

// upgradeRun is one hot upgrade under live chat. It asserts what every
// upgrade must keep: every client finishes with every message delivered
// once and in order and no disconnect (the clients fail at once on one,
// and BOSH clients report failed HTTP requests); ejabberd never sees the
// sidecar's node go down (a watcher on the node records every nodedown);
// every session keeps its c2s process; and the old process exits once what
// it kept has ended.
type upgradeRun struct {
	t             *testing.T
	ej            *harness.Ejabberd
	flags         []string
	handoff       string
	c2s, c2sTLS   string
	http          string
	old, new      *sidecar
	live          map[string]*nodeClient
	pidsBefore    []string
	successor     int // the pid of the process SIGUSR2 started
	users         []string
	sessionsQuery string
}

// upgradeCapSeconds caps how long each pair sends, 10 messages a second.
// The pairs send until finish signals them (SIGUSR2), so that their chat
// spans the upgrade however slowly a loaded box gets there; they must have
// sent at least upgradeMinMessages by then (the upgrade's steps sleep 15 s
// in all while the pairs chat).
const (
	upgradeCapSeconds  = 150
	upgradeMinMessages = 50
)

func newUpgradeRun(t *testing.T, tg target, withTLS bool) *upgradeRun {
	u := &upgradeRun{t: t, ej: tg.startEjabberd(t, harness.Options{}),
		users: []string{"alice", "bob", "carol", "dave", "erin", "frank"},
		sessionsQuery: `lists:sort([{U, R, ejabberd_sm:get_session_pid(U, S, R)}
		    || {U, S, R} <- ejabberd_sm:dirty_get_sessions_list()])`}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, user := range u.users[2:] {
		if err := u.ej.Register(ctx, user, "localhost", demoPassword); err != nil {
			t.Fatal(err)
		}
	}
	u.c2s, u.http = freeAddr(t), freeAddr(t)
	u.handoff = filepath.Join(t.TempDir(), "handoff.sock")
	// Without a certificate the c2s listener serves plain XMPP, which moves.
	u.flags = []string{"--c2s-addr", u.c2s, "--admin-addr", "", "--handoff-socket", u.handoff}
	if withTLS {
		cert, key, err := harness.SelfSignedCert(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		u.c2sTLS = freeAddr(t)
		u.flags = append(u.flags, "--c2s-tls-addr", u.c2sTLS, "--tls-cert", cert, "--tls-key", key)
	}
	u.old = startSidecar(t, u.ej, u.http, u.flags...)
	eval(t, u.ej, `Watch = fun Loop(Events) ->
	        receive
	            {nodedown, N, _} -> Loop([N | Events]);
	            {get, From} -> From ! {downs, Events}, Loop(Events);
	            _ -> Loop(Events)
	        end
	    end,
	    Pid = spawn(fun() -> ok = net_kernel:monitor_nodes(true, [{node_type, all}]), Watch([]) end),
	    register(megaphone_upgrade_watch, Pid), ok`)
	return u
}

// clients starts the live pairs (name: script and its arguments) and
// waits until all are logged in.
func (u *upgradeRun) clients(pairs map[string][]string) {
	t := u.t
	live := []string{"--password", demoPassword, "--mode", "live", "--duration", fmt.Sprint(upgradeCapSeconds),
		"--until-signal", "--interval-ms", "100", "--settle", "5", "--timeout", fmt.Sprint(upgradeCapSeconds + 60)}
	u.live = make(map[string]*nodeClient)
	for name, args := range pairs {
		u.live[name] = startNodeClient(t, append(args, live...)...)
	}
	for _, c := range u.live {
		c.waitReady(t)
	}
	sessions := eval(t, u.ej, u.sessionsQuery)
	if u.pidsBefore = c2sPids(sessions, u.users...); len(u.pidsBefore) != len(u.users) {
		t.Fatalf("want one c2s for each of %v before the upgrade, sessions: %s", u.users, sessions)
	}
}

// failedTakeovers makes two takeovers fail, as a wrong or crashing new
// binary would: one speaks another handoff version, the other takes the
// state and hangs up before acknowledging it.
func (u *upgradeRun) failedTakeovers() {
	t := u.t
	for _, version := range []string{"megaphone-handoff-0", "megaphone-handoff-1"} {
		c, err := net.DialTimeout("unix", u.handoff, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		hello := append([]byte{'T', 0, 0, 0, byte(len(version))}, version...)
		if _, err := c.Write(hello); err != nil {
			t.Fatal(err)
		}
		// The state frame (kind, length, msgpack), or nothing for a
		// version the old process does not speak.
		head := make([]byte, 5)
		_, err = io.ReadFull(c, head)
		if version == "megaphone-handoff-0" {
			if err == nil {
				t.Errorf("the old process answered a takeover of another handoff version: %q", head)
			}
		} else if err != nil || head[0] != 'S' {
			t.Errorf("no state from the old process: %q %v", head, err)
		} else if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(head[1:]))); err != nil {
			t.Error(err)
		}
		c.Close()
	}
	waitUntil(t, 10*time.Second, "the old process carries on after two failed takeovers", func() bool {
		return strings.Count(u.old.logs(), "takeover failed; carrying on") == 2
	})
	if strings.Contains(u.old.logs(), "listening afresh") {
		t.Errorf("a failed takeover lost a listening socket (and what queued on it):\n%s", tail(u.old.logs(), 20))
	}
	if !strings.Contains(u.old.logs(), `resuming what was paused	{"links": 1, "streams": 4}`) {
		t.Errorf("the second takeover did not fail with the link and the four streams paused:\n%s", tail(u.old.logs(), 20))
	}
	time.Sleep(3 * time.Second) // chatting through the old process, resumed
}

// upgrade starts the new binary with --takeover while the pairs chat.
func (u *upgradeRun) upgrade() {
	t := u.t
	time.Sleep(4 * time.Second) // chatting through the old process
	u.new = startSidecar(t, u.ej, u.http, append([]string{"--takeover", u.handoff}, u.flags...)...)
	u.new.name = u.old.name
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("old sidecar:\n%s\nnew sidecar:\n%s", tail(u.old.logs(), 60), tail(u.new.logs(), 60))
		}
	})
	if !strings.Contains(u.new.logs(), "took over the running sidecar's node") {
		t.Fatalf("the new process did not take over:\n%s", u.new.logs())
	}
	u.checkPidsKept()
}

// upgradeBySignal sends the running sidecar SIGUSR2: it starts its own
// binary with --takeover, whose log joins its own (they share stderr).
func (u *upgradeRun) upgradeBySignal() {
	t := u.t
	time.Sleep(4 * time.Second) // chatting through the old process
	if err := u.old.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	started := regexp.MustCompile(`started the new binary to take over\s+\{"path": "[^"]*", "pid": (\d+)\}`)
	waitUntil(t, 30*time.Second, "the successor takes over", func() bool {
		logs := u.old.logs()
		if m := started.FindStringSubmatch(logs); m != nil && u.successor == 0 {
			pid, _ := strconv.Atoi(m[1])
			u.successor = pid
			t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) }) // started by our signal
		}
		return strings.Contains(logs, "took over: running")
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("old and new sidecar:\n%s", tail(u.old.logs(), 80))
		}
	})
	u.checkPidsKept()
	// The successor carries on after the old process has gone.
	select {
	case <-u.old.exited:
		t.Fatal("the old process exited while TLS streams still used it")
	default:
	}
}

// checkPidsKept checks every session kept its c2s process.
func (u *upgradeRun) checkPidsKept() {
	t := u.t
	time.Sleep(4 * time.Second) // chatting through the new process
	sessions := eval(t, u.ej, u.sessionsQuery)
	if during := c2sPids(sessions, u.users...); strings.Join(during, " ") != strings.Join(u.pidsBefore, " ") {
		t.Errorf("c2s processes changed across the upgrade: before %v, after %v; sessions:\n%s", u.pidsBefore, during, sessions)
	}
}

// finish waits for the pairs and checks what every upgrade must keep.
func (u *upgradeRun) finish() {
	t := u.t
	for _, c := range u.live {
		_ = c.cmd.Process.Signal(syscall.SIGUSR2) // started by this test
	}
	for name, c := range u.live {
		var res struct {
			clientResult
			HTTPErrors map[string]map[string]int `json:"http_errors"` // BOSH: failed requests by status
		}
		if !c.finished(t, 2*time.Minute, &res) {
			t.Fatalf("%s: clients did not finish\n%s", name, tail(c.stderr.String(), 40))
		}
		// ok is false on any disconnect, stream error, loss, duplicate or
		// reordering.
		if !res.OK {
			t.Errorf("%s: %s\n%s", name, res.Error, tail(c.stderr.String(), 40))
		}
		if res.Sent["a"] < upgradeMinMessages || res.Received["b"] != res.Sent["a"] {
			t.Errorf("%s: sent %v, received %v", name, res.Sent, res.Received)
		}
		// Status 0 is a request the network failed, e.g. on a keep-alive
		// connection closed as the client reused it (RFC 9112 §9.3.1; the
		// old process leaves its idle ones to the client for that reason).
		// BOSH clients re-send the rid on a new connection, and ok above
		// says nothing was lost; an HTTP error status would be ours.
		for side, errs := range res.HTTPErrors {
			for status, n := range errs {
				if status == "0" {
					t.Logf("%s: side %s re-sent %d request(s) after a closed keep-alive connection", name, side, n)
					continue
				}
				t.Errorf("%s: side %s had %d request(s) answered %s across the upgrade", name, side, n, status)
			}
		}
	}
	// A sidecar built with -race (MEGAPHONE_BIN) reports races in its log.
	for _, sc := range []*sidecar{u.old, u.new} {
		if sc != nil && strings.Contains(sc.logs(), "WARNING: DATA RACE") {
			t.Errorf("data race in a sidecar:\n%s", sc.logs())
		}
	}
	downs := eval(t, u.ej, `megaphone_upgrade_watch ! {get, self()}, receive {downs, D} -> D after 5000 -> timeout end`)
	// The watcher does see hidden nodes go: each eval's probe node is one.
	if !strings.Contains(downs, "probe_") || strings.Contains(downs, u.old.name) {
		t.Errorf("ejabberd saw the sidecar's node go down during the upgrade (or the watcher saw nothing): %s", downs)
	}
	select {
	case <-u.old.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("the old process did not exit once empty:\n%s", tail(u.old.logs(), 30))
	}
	if hidden := eval(t, u.ej, "nodes(hidden)"); !strings.Contains(hidden, u.old.name) {
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

// processGone reports whether pid has exited (a zombie counts: its parent
// may be an init that does not reap).
func processGone(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) state ...: the state follows the last ')'.
	rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
	return strings.HasPrefix(strings.TrimSpace(rest), "Z")
}
