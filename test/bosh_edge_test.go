package test

import (
	"encoding/base64"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// BOSH served at the edge (--bosh-mode edge): the sidecar keeps the BOSH
// session, ejabberd runs only its c2s. These tests run a real ejabberd
// on both targets; the relay mode's BOSH tests also run in edge mode with
// MEGAPHONE_TEST_BOSH_MODE=edge.

// countByModule counts the node's processes started by one module.
func countByModule(t *testing.T, ej *harness.Ejabberd, mods ...string) int {
	t.Helper()
	return evalInt(t, ej, fmt.Sprintf(`length([P || P <- erlang:processes(),
	    case proc_lib:translate_initial_call(P) of
	        {M, _, _} -> lists:member(M, [%s]);
	        _ -> false
	    end])`, strings.Join(mods, ", ")))
}

// A Strophe.js user over BOSH at the edge chats with an @xmpp/client user
// over STARTTLS, 200 messages each way in order (login with SASL and the
// stream restart, roster, logout with a client terminate); while they are
// logged in, each BOSH session costs ejabberd exactly one process, its
// c2s, which ejabberd shows as an http_bind session from the client's real
// address; after the logout nothing is left.
func TestBOSHEdgeChatWithStreamUser(t *testing.T) {
	forEachTarget(t, testBOSHEdgeChatWithStreamUser)
}

func testBOSHEdgeChatWithStreamUser(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	base := evalInt(t, ej, leftoverExpr)
	sc := startStreamSidecar(t, ej, "--bosh-mode", "edge")
	res := startNodeClient(t, "mixed_chat.mjs", "--bosh-url", sc.url(), "--service", "xmpp://"+sc.c2s,
		"--starttls", "required", "--domain", "localhost", "--a", "alice", "--b", "bob",
		"--password", demoPassword, "--insecure", "--count", "200", "--timeout", "120").wait(t, 3*time.Minute)
	if res.Received["a"] != 200 || res.Received["b"] != 200 {
		t.Errorf("received %v, want 200 each", res.Received)
	}

	// Two Strophe users, live, from 127.0.0.2, long enough for the checks
	// below on a loaded machine (each eval starts an Erlang node).
	before := evalInt(t, ej, "erlang:system_info(process_count)")
	c := startClient(t, sc.url(), "--mode", "live", "--duration", "25", "--settle", "4", "--timeout", "90",
		"--local-address", "127.0.0.2")
	c.waitReady(t)
	if n := countByModule(t, ej, "ejabberd_bosh", "megaphone_bosh"); n != 0 {
		t.Errorf("%d ejabberd_bosh/megaphone_bosh processes for edge sessions, want 0", n)
	}
	if n := countByModule(t, ej, "ejabberd_c2s", "xmpp_stream_in"); n != 2 {
		t.Errorf("%d c2s processes for 2 edge sessions, want 2", n)
	}
	t.Logf("process count grew by %d for 2 sessions", evalInt(t, ej, "erlang:system_info(process_count)")-before)
	wantHTTPBindSessionsFrom127002(t, ej, 2)
	// The operator sees them in megaphone:status(): the sidecar keeps them.
	if n := evalInt(t, ej, `lists:sum([maps:get(bosh_edge_sessions, maps:get(report, S)) || S <- maps:get(sidecars, megaphone:status())])`); n != 2 {
		t.Errorf("megaphone:status() reports %d BOSH sessions at the edge, want 2", n)
	}
	c.wait(t, time.Minute)
	waitUntil(t, 10*time.Second, "nothing left after logout", func() bool {
		return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == 0 &&
			evalInt(t, ej, leftoverExpr) == base
	})
}

// boshLogin is a logged-in session of a hand-written BOSH client
// (rawBOSH), to drive the protocol's corners a library client never takes.
type boshLogin struct {
	*rawBOSH
	t   *testing.T
	sid string
	rid int
}

func newBOSHLogin(t *testing.T, url string) *boshLogin {
	return &boshLogin{rawBOSH: newRawBOSH(url), t: t}
}

// send posts the next rid with attrs and payload.
func (b *boshLogin) send(attrs, payload string) string {
	b.t.Helper()
	b.rid++
	_, out := b.post(b.body(b.rid, attrs, payload))
	return out
}

func (b *boshLogin) body(rid int, attrs, payload string) string {
	return fmt.Sprintf("<body xmlns='%s' sid='%s' rid='%d' %s>%s</body>", httpbindNS, b.sid, rid, attrs, payload)
}

// login opens a session and logs user in: SASL PLAIN, the restart, the
// resource binding. It returns the bound JID.
func (b *boshLogin) login(user string) string {
	b.t.Helper()
	b.rid = 5000
	_, out := b.post(fmt.Sprintf("<body xmlns='%s' rid='%d' to='localhost' wait='5' hold='1' ver='1.6' "+
		"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh' xml:lang='en'/>", httpbindNS, b.rid))
	m := regexp.MustCompile(`sid='([^']+)'`).FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "authid=") || !strings.Contains(out, "PLAIN") {
		b.t.Fatalf("session creation: %q", out)
	}
	b.sid = m[1]
	cred := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + demoPassword))
	if out = b.send("", "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"+cred+"</auth>"); !strings.Contains(out, "<success") {
		b.t.Fatalf("auth: %q", out)
	}
	if out = b.send("xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh' to='localhost'", ""); !strings.Contains(out, "urn:ietf:params:xml:ns:xmpp-bind") {
		b.t.Fatalf("restart: %q", out)
	}
	out = b.send("", "<iq type='set' id='bind' xmlns='jabber:client'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>raw</resource></bind></iq>")
	jid := regexp.MustCompile(`<jid>([^<]+)</jid>`).FindStringSubmatch(out)
	if jid == nil {
		b.t.Fatalf("bind: %q", out)
	}
	return jid[1]
}

// The protocol's corners against a real ejabberd: an unknown sid, rids
// sent out of order (c2s gets them in rid order), a rid past the window
// (the session ends, and its c2s), a client terminate (the c2s ends), and
// the inactivity timeout (the c2s ends).
func TestBOSHEdgeProtocol(t *testing.T) { forEachTarget(t, testBOSHEdgeProtocol) }

func testBOSHEdgeProtocol(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "", "--bosh-mode", "edge", "--bosh-inactivity", "3s")
	sessions := func() int { return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") }
	c2sPid := func(jid string) string {
		user, rest, _ := strings.Cut(jid, "@")
		_, res, _ := strings.Cut(rest, "/")
		return strings.TrimSpace(eval(t, ej, fmt.Sprintf(
			`pid_to_list(ejabberd_sm:get_session_pid(<<"%s">>, <<"localhost">>, <<"%s">>))`, user, res)))
	}
	alive := func(pid string) bool {
		return strings.TrimSpace(eval(t, ej, fmt.Sprintf(`is_process_alive(list_to_pid(%s))`, pid))) == "true"
	}

	unknown := newBOSHLogin(t, sc.url())
	unknown.sid, unknown.rid = "no-such-session", 41
	if out := unknown.send("", ""); !strings.Contains(out, "type='terminate'") || !strings.Contains(out, "condition='item-not-found'") {
		t.Errorf("unknown sid: %q", out)
	}

	// Out of order: rid N+2 arrives first and waits for N+1.
	b := newBOSHLogin(t, sc.url())
	jid := b.login("alice")
	ping := func(id string) string {
		return "<iq type='get' id='" + id + "' to='localhost' xmlns='jabber:client'><ping xmlns='urn:xmpp:ping'/></iq>"
	}
	n := b.rid
	second := make(chan string, 1)
	go func() { _, out := b.post(b.body(n+2, "", ping("second"))); second <- out }()
	time.Sleep(300 * time.Millisecond)
	_, out := b.post(b.body(n+1, "", ping("first")))
	out += <-second
	b.rid = n + 2
	for i := 0; i < 3 && !strings.Contains(out, "id='second'") && !strings.Contains(out, `id="second"`); i++ {
		out += b.send("", "")
	}
	first, sec := strings.Index(out, "first"), strings.Index(out, "second")
	if first < 0 || sec < 0 || first > sec {
		t.Errorf("pings answered out of order or not at all: %q", out)
	}

	// A client terminate ends the c2s.
	pid := c2sPid(jid)
	if out := b.send("type='terminate'", "<presence type='unavailable' xmlns='jabber:client'/>"); !strings.Contains(out, "type='terminate'") {
		t.Errorf("terminate: %q", out)
	}
	waitUntil(t, 10*time.Second, "c2s ends after the client's terminate", func() bool { return !alive(pid) })

	// A rid past the window ends the session and its c2s.
	b = newBOSHLogin(t, sc.url())
	pid = c2sPid(b.login("alice"))
	b.rid += 50
	if out := b.send("", ""); !strings.Contains(out, "condition='item-not-found'") {
		t.Errorf("rid past the window: %q", out)
	}
	waitUntil(t, 10*time.Second, "c2s ends after a bad rid", func() bool { return !alive(pid) })

	// A client that stops polling: the session ends by inactivity (3 s
	// after its last answer, here the bind's), and its c2s with it.
	b = newBOSHLogin(t, sc.url())
	pid = c2sPid(b.login("bob"))
	if sessions() != 1 {
		t.Errorf("%d sessions, want 1", sessions())
	}
	waitUntil(t, 15*time.Second, "c2s ends by inactivity", func() bool { return !alive(pid) && sessions() == 0 })
	if out := b.send("", ""); !strings.Contains(out, "condition='item-not-found'") {
		t.Errorf("request after the inactivity timeout: %q", out)
	}
}

// An edge session lives in the sidecar: when the sidecar dies its c2s
// ends at once (it monitors the sidecar), not after an inactivity window;
// the client's next request, to a restarted sidecar, gets item-not-found,
// and clients log in again and chat.
func TestBOSHEdgeSidecarRestart(t *testing.T) { forEachTarget(t, testBOSHEdgeSidecarRestart) }

func testBOSHEdgeSidecarRestart(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	base := evalInt(t, ej, leftoverExpr)
	sc := startSidecar(t, ej, "", "--bosh-mode", "edge")
	b := newBOSHLogin(t, sc.url())
	jid := b.login("alice")
	user, rest, _ := strings.Cut(jid, "@")
	_, res, _ := strings.Cut(rest, "/")
	pid := strings.TrimSpace(eval(t, ej, fmt.Sprintf(
		`pid_to_list(ejabberd_sm:get_session_pid(<<"%s">>, <<"localhost">>, <<"%s">>))`, user, res)))
	sc.kill()
	waitUntil(t, 5*time.Second, "the c2s ends with the sidecar", func() bool {
		return strings.TrimSpace(eval(t, ej, fmt.Sprintf(`is_process_alive(list_to_pid(%s))`, pid))) == "false" &&
			evalInt(t, ej, leftoverExpr) == base
	})

	sc = startSidecar(t, ej, sc.addr, "--bosh-mode", "edge")
	b.client.CloseIdleConnections() // their other ends died with the sidecar
	if out := b.send("", ""); !strings.Contains(out, "condition='item-not-found'") {
		t.Errorf("the old session's next request: %q", out)
	}
	res2 := startClient(t, sc.url(), "--mode", "chat", "--count", "20", "--timeout", "60").wait(t, 2*time.Minute)
	if res2.Received["a"] != 20 || res2.Received["b"] != 20 {
		t.Errorf("received %v after the restart, want 20 each", res2.Received)
	}
}

// A hot upgrade of a sidecar in edge mode is refused before anything
// stops: the new process exits, the old one says why and carries on, and
// its edge sessions never notice.
func TestBOSHEdgeRefusesHotUpgrade(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	handoff := filepath.Join(t.TempDir(), "handoff.sock")
	old := startSidecar(t, ej, "", "--bosh-mode", "edge", "--handoff-socket", handoff)
	b := newBOSHLogin(t, old.url())
	b.login("alice")

	successor := spawnSidecar(t, ej, freeAddr(t), "--bosh-mode", "edge", "--takeover", handoff)
	select {
	case <-successor.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("the takeover did not give up:\n%s", successor.logs())
	}
	waitUntil(t, 10*time.Second, "the old process logs the refusal", func() bool {
		return strings.Contains(old.logs(), "hot upgrade refused: --bosh-mode edge")
	})
	out := b.send("", "<iq type='get' id='after' to='localhost' xmlns='jabber:client'><ping xmlns='urn:xmpp:ping'/></iq>")
	for i := 0; i < 3 && !strings.Contains(out, "after"); i++ {
		out += b.send("", "")
	}
	if !strings.Contains(out, "after") {
		t.Errorf("the edge session after the refused upgrade: %q", out)
	}
}
