package test

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/test/harness"
)

// Two real Strophe.js clients log in through the sidecar, exchange 100
// messages each way (XML-special and non-ASCII text included), fetch their
// rosters and log out; ejabberd sees the sidecar as a hidden node.
func TestBOSHChatThroughSidecar(t *testing.T) { forEachTarget(t, testBOSHChatThroughSidecar) }

func testBOSHChatThroughSidecar(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "")

	res := startClient(t, sc.url(), "--mode", "chat", "--count", "100", "--timeout", "120").wait(t, 3*time.Minute)
	if res.Received["a"] != 100 || res.Received["b"] != 100 {
		t.Errorf("received %v, want 100 each", res.Received)
	}

	hidden := eval(t, ej, "nodes(hidden)")
	if !strings.Contains(hidden, sc.name) {
		t.Errorf("sidecar %s not in nodes(hidden) = %s", sc.name, hidden)
	}
	if visible := eval(t, ej, "nodes()"); strings.Contains(visible, sc.name) {
		t.Errorf("sidecar %s is in nodes() = %s: it must be hidden", sc.name, visible)
	}
	status := eval(t, ej, "megaphone:status()")
	if !strings.Contains(status, fmt.Sprintf("protocol => %d", etf.ProtocolVersion)) || !strings.Contains(status, sc.name) {
		t.Errorf("megaphone:status() does not show the sidecar:\n%s", status)
	}
	waitUntil(t, 10*time.Second, "sessions gone after logout", func() bool {
		return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == 0
	})
}

// While clients are logged in through the sidecar, ejabberd's session table
// shows them as BOSH sessions (http_bind) from the clients' real address:
// they connect from 127.0.0.2, the sidecar's own link comes from 127.0.0.1.
func TestBOSHSessionsShowHTTPBindAndRealIP(t *testing.T) {
	forEachTarget(t, testBOSHSessionsShowHTTPBindAndRealIP)
}

func testBOSHSessionsShowHTTPBindAndRealIP(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "")
	c := startClient(t, sc.url(), "--mode", "live", "--duration", "6", "--settle", "5", "--timeout", "60",
		"--local-address", "127.0.0.2")
	c.waitReady(t)

	wantHTTPBindSessionsFrom127002(t, ej, 2)
	c.wait(t, time.Minute)
}

// wantHTTPBindSessionsFrom127002 checks that ejabberd's session table
// shows want BOSH sessions (http_bind) from the client address 127.0.0.2.
func wantHTTPBindSessionsFrom127002(t *testing.T, ej *harness.Ejabberd, want int) {
	t.Helper()
	info := eval(t, ej, `[ {proplists:get_value(conn, I), proplists:get_value(ip, I)}
	    || {U, S, R} <- ejabberd_sm:dirty_get_sessions_list(),
	       I <- [ejabberd_sm:get_user_info(U, S, R)] ]`)
	re := regexp.MustCompile(`\{http_bind,\{\{127,0,0,2\},\d+\}\}`)
	if n := len(re.FindAllString(info, -1)); n != want {
		t.Errorf("want %d sessions {http_bind, {{127,0,0,2}, Port}}, got %s", want, info)
	}
}

// kill -9 of the sidecar mid-chat: the shim ends the request processes it
// started at once, and a sidecar restarted within the BOSH inactivity window
// carries the same BOSH sessions on; the clients never notice.
func TestSidecarKilledAndRestartedMidChat(t *testing.T) {
	forEachTarget(t, testSidecarKilledAndRestartedMidChat)
}

func testSidecarKilledAndRestartedMidChat(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "")
	c := startClient(t, sc.url(), "--mode", "live", "--duration", "16", "--interval-ms", "200",
		"--settle", "10", "--timeout", "90")
	c.waitReady(t)
	time.Sleep(3 * time.Second)

	// Strophe keeps long-polls parked in ejabberd; they are in flight now.
	if n := evalInt(t, ej, "maps:get(in_flight, megaphone:status())"); n == 0 {
		t.Logf("note: no request in flight at the moment of the kill")
	}
	sc.kill()
	waitUntil(t, 3*time.Second, "shim ends the dead sidecar's requests", func() bool {
		return evalInt(t, ej, "length(maps:get(sidecars, megaphone:status()))") == 0 &&
			evalInt(t, ej, `length([P || P <- erlang:processes(),
			    proc_lib:translate_initial_call(P) == {megaphone_bosh, run, 6}])`) == 0
	})
	// The BOSH sessions are ejabberd's; they must still be there.
	if n := evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())"); n != 2 {
		t.Fatalf("%d sessions after the sidecar died, want 2 (they live for their inactivity window)", n)
	}

	startSidecar(t, ej, sc.addr)
	res := c.wait(t, 2*time.Minute)
	t.Logf("live chat across the restart: %+v", res)
}

// A sidecar that does not come back: the BOSH sessions end by ejabberd's
// own timeouts, and nothing is left behind on the node. ejabberd_bosh holds
// a long-poll until its `wait` runs out even when the request's caller is
// gone (the same happens when a client's TCP connection dies under
// ejabberd's own listener), and only then starts counting inactivity; so a
// session ends after wait + max_inactivity.
func TestSidecarGoneSessionsEndByInactivity(t *testing.T) {
	waitsOnTimers(t)
	forEachTarget(t, testSidecarGoneSessionsEndByInactivity)
}

func testSidecarGoneSessionsEndByInactivity(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{BOSHInactivity: 5 * time.Second})
	base := evalInt(t, ej, leftoverExpr)
	sc := startSidecar(t, ej, "")
	c := startClient(t, sc.url(), "--mode", "live", "--duration", "30", "--wait", "8", "--timeout", "60")
	c.waitReady(t)
	if n := evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())"); n != 2 {
		t.Fatalf("%d sessions, want 2", n)
	}
	_ = c.cmd.Process.Kill() // the clients vanish with the sidecar
	sc.kill()

	waitUntil(t, 40*time.Second, "sessions end by wait + inactivity", func() bool {
		return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == 0 &&
			evalInt(t, ej, leftoverExpr) == base
	})
	if n := evalInt(t, ej, "length(maps:get(sidecars, megaphone:status()))"); n != 0 {
		t.Errorf("%d sidecar sessions left in the shim", n)
	}
}

// Bad input gets a clear HTTP or BOSH error, and nothing else breaks.
func TestBOSHBadInput(t *testing.T) { forEachTarget(t, testBOSHBadInput) }

func testBOSHBadInput(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "")
	post := func(body string) (int, string) {
		t.Helper()
		resp, err := http.Post(sc.url(), "text/xml; charset=utf-8", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	const ns = "http://jabber.org/protocol/httpbind"

	if got := rawHTTP(t, sc.addr, "NONSENSE\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 400") {
		t.Errorf("malformed HTTP: %q", got)
	}
	if got := rawHTTP(t, sc.addr, "POST /bosh HTTP/1.1\r\nHost x\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 400") {
		t.Errorf("malformed header: %q", got)
	}
	if code, _ := post("<body xmlns='" + ns + "'>" + strings.Repeat("x", 300<<10) + "</body>"); code != 413 {
		t.Errorf("oversized body: %d, want 413", code)
	}
	if code, _ := post("this is not xml"); code != 400 {
		t.Errorf("non-XML body: %d, want 400", code)
	}
	if code, _ := post(`<!DOCTYPE b [<!ENTITY a "a">]><body xmlns='` + ns + `'>&a;</body>`); code != 400 {
		t.Errorf("DTD body: %d, want 400", code)
	}
	code, body := post("<body xmlns='" + ns + "' sid='no-such-session' rid='42'/>")
	if code != 200 || !strings.Contains(body, "type='terminate'") || !strings.Contains(body, "item-not-found") {
		t.Errorf("unknown sid: %d %q", code, body)
	}

	// A session, then a rid far outside its window.
	code, body = post("<body xmlns='" + ns + "' rid='1000' to='localhost' wait='10' hold='1' ver='1.6' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
	sid := regexp.MustCompile(`sid='([0-9a-f]+)'`).FindStringSubmatch(body)
	if code != 200 || sid == nil {
		t.Fatalf("session creation: %d %q", code, body)
	}
	code, body = post(fmt.Sprintf("<body xmlns='%s' sid='%s' rid='999999'/>", ns, sid[1]))
	if code != 200 || !strings.Contains(body, "type='terminate'") {
		t.Errorf("wrong rid: %d %q", code, body)
	}

	// Nothing else broke: real clients still chat through the same sidecar.
	startClient(t, sc.url(), "--mode", "chat", "--count", "10", "--timeout", "60").wait(t, 2*time.Minute)
	if !ej.Alive() {
		t.Fatal("ejabberd died")
	}
}
