package test

import (
	"crypto/tls"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/test/harness"
)

// streamSidecar runs the sidecar with every client listener on: XMPP with
// required STARTTLS, direct TLS, WebSocket at /ws, and BOSH.
type streamSidecar struct {
	*sidecar
	c2s, c2sTLS string
}

func startStreamSidecar(t *testing.T, ej *harness.Ejabberd, extra ...string) *streamSidecar {
	t.Helper()
	cert, key, err := harness.SelfSignedCert(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c2s, c2sTLS := freeAddr(t), freeAddr(t)
	args := append([]string{"--c2s-addr", c2s, "--c2s-tls-addr", c2sTLS, "--tls-cert", cert, "--tls-key", key}, extra...)
	return &streamSidecar{sidecar: startSidecar(t, ej, "", args...), c2s: c2s, c2sTLS: c2sTLS}
}

func (s *streamSidecar) wsURL() string { return "ws://" + s.addr + "/ws" }

// xmppChat runs the real @xmpp/client pair (alice and bob) on a service.
func xmppChat(t *testing.T, service string, args ...string) *nodeClient {
	t.Helper()
	return startNodeClient(t, append([]string{"xmpp_chat.mjs", "--service", service, "--domain", "localhost",
		"--a", "alice", "--b", "bob", "--password", demoPassword, "--insecure"}, args...)...)
}

// Real @xmpp/client clients log in through the sidecar over STARTTLS,
// direct TLS and WebSocket, chat 1,000 messages each way in order, fetch
// rosters and log out; ejabberd runs their c2s in element mode and reports
// the right transport and the clients' real address; nothing is left.
func TestXMPPClientsThroughSidecar(t *testing.T) { forEachTarget(t, testXMPPClientsThroughSidecar) }

func testXMPPClientsThroughSidecar(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	base := evalInt(t, ej, leftoverExpr)
	sc := startStreamSidecar(t, ej)
	fds := sc.openFiles(t)

	for _, tc := range []struct {
		name, service string
		args          []string
		transport     string // as ejabberd's session table shows it
	}{
		{"starttls", "xmpp://" + sc.c2s, []string{"--starttls", "required"}, "c2s_tls"},
		{"direct-tls", "xmpps://" + sc.c2sTLS, nil, "c2s_tls"},
		{"websocket", sc.wsURL(), nil, "websocket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := xmppChat(t, tc.service, append([]string{"--count", "1000", "--timeout", "120"}, tc.args...)...).
				wait(t, 3*time.Minute)
			if res.Received["a"] != 1000 || res.Received["b"] != 1000 {
				t.Errorf("received %v", res.Received)
			}
			if tc.transport != "websocket" && (res.Secure == nil || !*res.Secure) {
				t.Errorf("stream was not encrypted: %+v", res)
			}

			// While logged in: the transport and the real client address.
			live := xmppChat(t, tc.service, append([]string{"--mode", "live", "--duration", "4", "--settle", "3",
				"--timeout", "60", "--local-address", "127.0.0.3"}, tc.args...)...)
			live.waitReady(t)
			info := eval(t, ej, `[ {proplists:get_value(conn, I), proplists:get_value(ip, I)}
			    || {U, S, R} <- ejabberd_sm:dirty_get_sessions_list(),
			       I <- [ejabberd_sm:get_user_info(U, S, R)] ]`)
			re := regexp.MustCompile(`\{` + tc.transport + `,\{\{127,0,0,3\},\d+\}\}`)
			if n := len(re.FindAllString(info, -1)); n != 2 {
				t.Errorf("want 2 sessions {%s, {{127,0,0,3}, Port}}, got %s", tc.transport, info)
			}
			live.wait(t, time.Minute)
			waitUntil(t, 10*time.Second, "c2s processes and the sidecar's sockets gone after logout", func() bool {
				return evalInt(t, ej, leftoverExpr) == base && sc.openFiles(t) <= fds
			})
		})
	}
	t.Run("strophe-websocket", func(t *testing.T) {
		res := startClient(t, sc.wsURL(), "--count", "1000", "--timeout", "120").wait(t, 3*time.Minute)
		if res.Received["a"] != 1000 || res.Received["b"] != 1000 {
			t.Errorf("received %v", res.Received)
		}
	})
}

// A new stream's c2s is collected as soon as its client's login is done
// (login_gc_interval, 1 s), long before the sweep (60 s) would get to it:
// left alone it keeps the login's garbage, 60-90 KiB (BENCH.md).
func TestXMPPLoginCollected(t *testing.T) { forEachTarget(t, testXMPPLoginCollected) }

func testXMPPLoginCollected(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej)
	c := rawLogin(t, sc.c2sTLS, "alice")
	defer c.Close()
	c2sMemory := `lists:sum([M || {U, S, R} <- ejabberd_sm:dirty_get_sessions_list(),
	    {memory, M} <- [erlang:process_info(ejabberd_sm:get_session_pid(U, S, R), memory)]])`
	waitUntil(t, 15*time.Second, "the new c2s collected once its login is done", func() bool {
		return evalInt(t, ej, c2sMemory) < 20000 &&
			evalInt(t, ej, `lists:sum([maps:get(gc_login, S) || S <- maps:get(sidecars, megaphone:status())])`) >= 1
	})
	if swept := evalInt(t, ej, `lists:sum([maps:get(gc_swept, S) || S <- maps:get(sidecars, megaphone:status())])`); swept != 0 {
		t.Errorf("the 60 s sweep ran already (%d): the test cannot tell who collected the c2s", swept)
	}
}

// Closing from every side: ejabberd kicks the session, the sidecar dies.
// Clients see the stream end, and ejabberd keeps no c2s process. The
// clients use stream management, so when their connection drops ejabberd
// keeps their session resumable for resume_timeout (XEP-0198), as it does
// for its own listeners; the test sets that to 3 s.
func TestXMPPStreamsClosedFromEverySide(t *testing.T) {
	ej := startEjabberd(t, harness.Options{ResumeTimeout: 3 * time.Second})
	base := evalInt(t, ej, leftoverExpr)
	sc := startStreamSidecar(t, ej)
	fds := sc.openFiles(t)

	// ejabberd kicks alice: her client ends (the pair reports failure).
	live := xmppChat(t, "xmpps://"+sc.c2sTLS, "--mode", "live", "--duration", "20", "--timeout", "60")
	live.waitReady(t)
	eval(t, ej, `[ejabberd_sm:kick_user(U, S) || {U, S, _} <- ejabberd_sm:dirty_get_sessions_list()], ok`)
	var kicked clientResult
	if !live.finished(t, 30*time.Second, &kicked) {
		t.Fatal("kicked clients did not end")
	}
	if kicked.OK {
		t.Errorf("clients did not notice the kick: %+v", kicked)
	}
	waitUntil(t, 10*time.Second, "no c2s after the kick", func() bool { return evalInt(t, ej, leftoverExpr) == base })
	// The sidecar's side: every client socket it held is closed again.
	waitUntil(t, 10*time.Second, "the sidecar's sockets back to baseline", func() bool { return sc.openFiles(t) <= fds })

	// The sidecar dies: every c2s it fed ends at once (they monitor it).
	live = xmppChat(t, "xmpp://"+sc.c2s, "--mode", "live", "--duration", "20", "--timeout", "60", "--starttls", "required")
	live.waitReady(t)
	if n := evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())"); n != 2 {
		t.Fatalf("%d sessions, want 2", n)
	}
	sc.kill()
	waitUntil(t, 15*time.Second, "c2s processes end with the sidecar (after resume_timeout)", func() bool {
		return evalInt(t, ej, leftoverExpr) == base &&
			evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == 0
	})
}

// Bad input on a stream gets a stream error and a close, and affects
// nobody else.
func TestXMPPBadInput(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej, "--handshake-timeout", "2s")
	tlsDial := func() net.Conn {
		t.Helper()
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", sc.c2sTLS,
			&tls.Config{InsecureSkipVerify: true}) // the test's own self-signed cert
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	exchange := func(c net.Conn, send string) string {
		t.Helper()
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, send); err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(c)
		return string(b)
	}
	header := `<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`

	// A healthy pair chats through the same sidecar the whole time.
	bystanders := xmppChat(t, "xmpps://"+sc.c2sTLS, "--mode", "live", "--duration", "10", "--timeout", "60")
	bystanders.waitReady(t)

	plain, err := net.DialTimeout("tcp", sc.c2s, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := exchange(plain, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); !strings.Contains(got, "<not-well-formed") {
		t.Errorf("garbage before the header: %q", got)
	}
	if got := exchange(tlsDial(), `<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>`+header); !strings.Contains(got, "<restricted-xml") {
		t.Errorf("entity bomb: %q", got)
	}
	plain, _ = net.DialTimeout("tcp", sc.c2s, 5*time.Second)
	if got := exchange(plain, header+`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGRlbW8=</auth>`); !strings.Contains(got, "<policy-violation") {
		t.Errorf("auth without the required STARTTLS: %q", got)
	}
	big := header + `<message to='bob@localhost'><body>` + strings.Repeat("x", 300<<10) + `</body></message>`
	if got := exchange(tlsDial(), big); !strings.Contains(got, "<policy-violation") {
		t.Errorf("stanza over max_stanza_size: %q", tail(got, 3))
	}
	// A TLS handshake that never finishes is cut at the handshake timeout.
	stall, _ := net.DialTimeout("tcp", sc.c2sTLS, 5*time.Second)
	start := time.Now()
	_ = stall.SetDeadline(time.Now().Add(10 * time.Second))
	if n, _ := stall.Read(make([]byte, 1)); n != 0 || time.Since(start) > 8*time.Second {
		t.Errorf("stalled TLS handshake was not cut (read %d bytes after %s)", n, time.Since(start))
	}
	stall.Close()

	if res := bystanders.wait(t, time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
}

// rawLogin logs user in over direct TLS by hand (SASL PLAIN, bind,
// presence) and returns the connection: a client the test controls byte by
// byte, e.g. one that then stops reading.
func rawLogin(t *testing.T, addr, user string) net.Conn {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr,
		&tls.Config{InsecureSkipVerify: true}) // the test's own self-signed cert
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	var seen strings.Builder
	expect := func(send, until string) {
		t.Helper()
		if _, err := io.WriteString(c, send); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		for !strings.Contains(seen.String(), until) {
			n, err := c.Read(buf)
			if err != nil {
				t.Fatalf("waiting for %q: %v; got %q", until, err, seen.String())
			}
			seen.Write(buf[:n])
		}
		seen.Reset()
	}
	header := `<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`
	loginSteps(user, header, expect)
	_ = c.SetDeadline(time.Time{})
	return c
}

// loginSteps logs user in (SASL PLAIN, bind, presence) through expect,
// which sends one piece of XML and waits for an answer holding until;
// open opens (and after SASL reopens) the stream.
func loginSteps(user, open string, expect func(send, until string)) {
	expect(open, "</stream:features>")
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + demoPassword))
	expect("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"+plain+"</auth>", "<success")
	expect(open, "</stream:features>")
	// Namespaced: a WebSocket message is a document of its own.
	expect("<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>", "</iq>")
	expect("<presence xmlns='jabber:client'/>", "<presence")
}

// A client that stops reading while ejabberd has much to send it is
// disconnected once its bounded queue in the sidecar is full; the sidecar's
// memory stays bounded and other clients chat on.
func TestXMPPClientThatNeverReads(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	registerCarol(t, ej)
	sc := startStreamSidecar(t, ej)
	bystanders := xmppChat(t, "xmpps://"+sc.c2sTLS, "--mode", "live", "--duration", "15", "--timeout", "90")
	bystanders.waitReady(t)

	carol := rawLogin(t, sc.c2sTLS, "carol")
	defer carol.Close()
	floodUser(t, ej, "carol@localhost") // who reads none of it
	waitUntil(t, 30*time.Second, "the slow reader is disconnected", func() bool {
		return strings.Contains(sc.logs(), "client reads too slowly")
	})
	waitUntil(t, 20*time.Second, "carol's session ends", func() bool {
		return !strings.Contains(eval(t, ej, "ejabberd_sm:dirty_get_sessions_list()"), "carol")
	})
	if res := bystanders.wait(t, 2*time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
}

// A WebSocket message over the stanza limit gets a stream error and a
// close; an XMPP stream through a stopped ejabberd ends instead of hanging.
func TestXMPPOversizeWebSocketAndEjabberdStopped(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej)

	ws, _, err := websocket.DefaultDialer.Dial(sc.wsURL(), http.Header{"Sec-WebSocket-Protocol": {"xmpp"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(15 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, []byte(`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>`)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // <open/> and <stream:features/>
		if _, _, err := ws.ReadMessage(); err != nil {
			t.Fatal(err)
		}
	}
	big := `<message xmlns="jabber:client" to="bob@localhost"><body>` + strings.Repeat("x", 300<<10) + `</body></message>`
	_ = ws.WriteMessage(websocket.TextMessage, []byte(big))
	sawError := false
	for i := 0; i < 5; i++ {
		_, msg, err := ws.ReadMessage()
		if err != nil {
			sawError = sawError || websocket.IsCloseError(err, websocket.CloseMessageTooBig, websocket.CloseNormalClosure)
			break
		}
		sawError = sawError || strings.Contains(string(msg), "policy-violation")
	}
	if !sawError {
		t.Error("oversized WebSocket message: no policy-violation and no close")
	}

	live := xmppChat(t, "xmpp://"+sc.c2s, "--mode", "live", "--duration", "30", "--timeout", "90", "--starttls", "required")
	live.waitReady(t)
	if err := ej.Stop(); err != nil {
		t.Fatal(err)
	}
	var res clientResult
	if !live.finished(t, 30*time.Second, &res) {
		t.Fatal("clients hang after ejabberd stopped")
	}
	if res.OK {
		t.Errorf("clients did not notice ejabberd stopping: %+v", res)
	}
	select {
	case <-sc.exited:
		t.Fatal("the sidecar exited when ejabberd stopped")
	default:
	}
}
