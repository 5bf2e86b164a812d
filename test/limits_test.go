package test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/test/harness"
)

// closedWithin reads conn until the sidecar closes it or limit passes,
// feeding it one line every half second meanwhile (a slowloris), and
// returns what the sidecar wrote and whether it closed the connection.
func closedWithin(t *testing.T, conn net.Conn, limit time.Duration, trickle string) (string, bool) {
	t.Helper()
	read := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(conn)
		read <- string(b)
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(limit)
	for {
		select {
		case got := <-read:
			return got, true
		case <-deadline:
			conn.Close()
			return <-read, false
		case <-tick.C:
			if trickle != "" {
				_, _ = io.WriteString(conn, trickle)
			}
		}
	}
}

func dialTCP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Slow HTTP clients cannot hold the BOSH listener: headers that trickle in
// are cut at the header timeout (--http-header-timeout, 3 s here), a body
// that trickles in at the read timeout (--http-read-timeout, 8 s here)
// with a 400; headers over --http-max-header-bytes (4 KiB here) get 431.
// A real client chats through the same sidecar meanwhile.
func TestBOSHSlowClientsAreCut(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "", "--http-header-timeout", "3s", "--http-read-timeout", "8s",
		"--http-max-header-bytes", "4096")
	bystanders := startClient(t, sc.url(), "--mode", "live", "--duration", "15", "--timeout", "90")
	bystanders.waitReady(t)

	if got := rawHTTP(t, sc.addr, "POST /bosh HTTP/1.1\r\nHost: x\r\nX-Big: "+strings.Repeat("x", 8<<10)+"\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 431") {
		t.Errorf("8 KiB of headers: %q", tail(got, 3))
	}

	type result struct {
		what, got string
		closed    bool
		after     time.Duration
	}
	results := make(chan result, 2)
	slow := func(what, opening, trickle string, limit time.Duration) {
		c := dialTCP(t, sc.addr)
		start := time.Now()
		_, _ = io.WriteString(c, opening)
		got, closed := closedWithin(t, c, limit, trickle)
		results <- result{what, got, closed, time.Since(start)}
	}
	// Bounds between the timeout and the next one up: without the header
	// timeout the read timeout (8 s) would cut the headers, and without
	// the read timeout nothing would cut the body.
	go slow("headers", "POST /bosh HTTP/1.1\r\nHost: x\r\n", "X-Slow: 1\r\n", 6*time.Second)
	go slow("body", "POST /bosh HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 100000\r\n\r\n<body ", "a", 20*time.Second)
	for i := 0; i < 2; i++ {
		r := <-results
		t.Logf("slow %s: closed=%v after %s: %q", r.what, r.closed, r.after.Round(100*time.Millisecond), tail(r.got, 2))
		if !r.closed {
			t.Errorf("slow %s still connected after %s", r.what, r.after.Round(time.Second))
		}
		if r.what == "body" && !strings.HasPrefix(r.got, "HTTP/1.1 400") {
			t.Errorf("slow body: answer %q, want 400", r.got)
		}
	}
	if res := bystanders.wait(t, time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
}

// A BOSH request that ejabberd holds longer than the sidecar's --max-wait
// is answered 504 at that bound, whatever `wait` the client asked for,
// and the shim drops the request: no worker is left on ejabberd.
func TestBOSHWaitBoundedAtTheEdge(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	sc := startSidecar(t, ej, "", "--max-wait", "3s")
	const ns = "http://jabber.org/protocol/httpbind"
	post := func(body string) (int, string, time.Duration) {
		t.Helper()
		start := time.Now()
		resp, err := http.Post(sc.url(), "text/xml; charset=utf-8", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), time.Since(start)
	}
	code, body, _ := post("<body xmlns='" + ns + "' rid='100' to='localhost' wait='60' hold='1' ver='1.6' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
	sid := regexp.MustCompile(`sid='([0-9a-f]+)'`).FindStringSubmatch(body)
	if code != 200 || sid == nil {
		t.Fatalf("session creation: %d %q", code, body)
	}
	// Nothing to say and nothing to hear: ejabberd holds this one for
	// its wait (60 s).
	edge := os.Getenv("MEGAPHONE_TEST_BOSH_MODE") == "edge"
	if edge && !strings.Contains(body, "wait='3'") {
		t.Errorf("the edge session does not grant wait=3: %q", body)
	}
	code, body, took := post(fmt.Sprintf("<body xmlns='%s' sid='%s' rid='101'/>", ns, sid[1]))
	if edge {
		// The sidecar keeps the session: the held poll is answered
		// empty when the wait it granted runs out.
		if code != http.StatusOK || strings.Contains(body, "terminate") || took > 15*time.Second {
			t.Errorf("held poll at the edge: %d %q after %s, want an empty answer at --max-wait", code, body, took.Round(100*time.Millisecond))
		}
		return
	}
	if code != http.StatusGatewayTimeout || took > 15*time.Second {
		t.Errorf("held poll: %d %q after %s, want 504 at --max-wait", code, body, took.Round(100*time.Millisecond))
	}
	waitUntil(t, 10*time.Second, "the shim drops the abandoned request", func() bool {
		return evalInt(t, ej, "maps:get(in_flight, megaphone:status())") == 0
	})
}

// Streams that stall while they open are cut at --handshake-timeout with
// a connection-timeout stream error where XML can still be spoken: before
// the header, before STARTTLS, inside the TLS handshake after <proceed/>,
// and on a WebSocket that never sends <open/>. A real pair chats meanwhile.
func TestStreamOpeningStallsAreCut(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej, "--handshake-timeout", "2s")
	bystanders := xmppChat(t, "xmpps://"+sc.c2sTLS, "--mode", "live", "--duration", "10", "--timeout", "60")
	bystanders.waitReady(t)

	header := `<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`
	const timeoutError = "<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
	for _, tc := range []struct {
		name, send string
		xmlError   bool // whether the cut can be said in XML
	}{
		{"nothing sent", "", true},
		{"half a header", "<stream:stream", true},
		{"no starttls", header, true},
		{"stalled TLS handshake", header + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>", false},
	} {
		c := dialTCP(t, sc.c2s)
		_, _ = io.WriteString(c, tc.send)
		got, closed := closedWithin(t, c, 10*time.Second, "")
		if !closed {
			t.Errorf("%s: still open after 10 s", tc.name)
		}
		if tc.xmlError && !strings.Contains(got, timeoutError) {
			t.Errorf("%s: got %q, want a connection-timeout stream error", tc.name, got)
		}
	}

	ws, _, err := websocket.DefaultDialer.Dial(sc.wsURL(), http.Header{"Sec-WebSocket-Protocol": {"xmpp"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got strings.Builder
	for {
		_, msg, err := ws.ReadMessage()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Error("WebSocket without <open/>: still open after 10 s")
			}
			break
		}
		got.Write(msg)
	}
	if !strings.Contains(got.String(), "connection-timeout") {
		t.Errorf("WebSocket without <open/>: got %q, want a connection-timeout stream error", got.String())
	}

	if res := bystanders.wait(t, time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
}

// wsLogin logs user in over WebSocket by hand (SASL PLAIN, bind,
// presence) and returns the connection, for a test that then stops
// reading.
func wsLogin(t *testing.T, url, user string) *websocket.Conn {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(url, http.Header{"Sec-WebSocket-Protocol": {"xmpp"}})
	if err != nil {
		t.Fatal(err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(15 * time.Second))
	expect := func(send, until string) {
		t.Helper()
		if err := ws.WriteMessage(websocket.TextMessage, []byte(send)); err != nil {
			t.Fatal(err)
		}
		for {
			_, msg, err := ws.ReadMessage()
			if err != nil {
				t.Fatalf("waiting for %q: %v", until, err)
			}
			if strings.Contains(string(msg), until) {
				return
			}
		}
	}
	loginSteps(user, `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>`, expect)
	_ = ws.SetReadDeadline(time.Time{})
	return ws
}

// A WebSocket client that stops reading while ejabberd has much to send
// it is disconnected once its bounded queue in the sidecar is full, as a
// TCP one is (TestXMPPClientThatNeverReads); other clients chat on.
func TestWebSocketClientThatNeverReads(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	registerCarol(t, ej)
	sc := startStreamSidecar(t, ej)
	bystanders := xmppChat(t, sc.wsURL(), "--mode", "live", "--duration", "15", "--timeout", "90")
	bystanders.waitReady(t)

	carol := wsLogin(t, sc.wsURL(), "carol")
	defer carol.Close()
	floodUser(t, ej, "carol@localhost")
	waitUntil(t, 30*time.Second, "the slow WebSocket reader is disconnected", func() bool {
		return strings.Contains(sc.logs(), "client reads too slowly")
	})
	waitUntil(t, 20*time.Second, "carol's session ends", func() bool {
		return !strings.Contains(eval(t, ej, "ejabberd_sm:dirty_get_sessions_list()"), "carol")
	})
	if res := bystanders.wait(t, 2*time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
}

// registerCarol adds a third user, for tests where alice and bob are the
// bystanders.
func registerCarol(t *testing.T, ej *harness.Ejabberd) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := ej.Register(ctx, "carol", "localhost", demoPassword); err != nil {
		t.Fatal(err)
	}
}

// floodUser has ejabberd route 20 MB of chat messages to jid at once.
func floodUser(t *testing.T, ej *harness.Ejabberd, jid string) {
	t.Helper()
	eval(t, ej, `Body = binary:copy(<<"x">>, 50000),
	    M = xmpp:decode({xmlel, <<"message">>, [{<<"to">>, <<"`+jid+`">>},
	        {<<"from">>, <<"bob@localhost/flood">>}, {<<"type">>, <<"chat">>}],
	        [{xmlel, <<"body">>, [], [{xmlcdata, Body}]}]}, <<"jabber:client">>, []),
	    [ejabberd_router:route(M) || _ <- lists:seq(1, 400)], ok`)
}

// A client that opens its stream and then says nothing is closed by
// ejabberd's own negotiation timeout (set to 3 s here), through the
// sidecar: the client gets the stream error, and the sidecar lets go of
// its socket.
func TestIdleUnauthenticatedStreamIsClosed(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{ExtraConfig: "negotiation_timeout: 3\n"})
	sc := startStreamSidecar(t, ej)
	fds := sc.openFiles(t)
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", sc.c2sTLS,
		&tls.Config{InsecureSkipVerify: true}) // the test's own self-signed cert
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, `<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`)
	got, closed := closedWithin(t, c, 20*time.Second, "")
	if !closed || !strings.Contains(got, "connection-timeout") {
		t.Errorf("idle unauthenticated stream: closed=%v, got %q", closed, got)
	}
	waitUntil(t, 10*time.Second, "the sidecar's sockets back to baseline", func() bool { return sc.openFiles(t) <= fds })
}
