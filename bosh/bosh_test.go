package bosh

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

const okBody = `<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='localhost' wait='60' hold='1'/>`

// goodBodies and badBodies are what every check of a request body must
// accept and refuse: checkBody (relay mode) and parseEdgeRequest (edge
// mode, which parses the body once and checks it as it goes).
var goodBodies = []string{
	okBody,
	`<?xml version='1.0'?><body xmlns='http://jabber.org/protocol/httpbind' sid='x' rid='2'><message xmlns='jabber:client' to='b@x'><body>&lt;&amp;&gt; ünï</body></message></body>`,
}

var badBodies = map[string]string{
	"empty":           "",
	"not xml":         "hello",
	"wrong root":      `<html xmlns='http://jabber.org/protocol/httpbind'/>`,
	"wrong ns":        `<body xmlns='jabber:client'/>`,
	"no ns":           `<body/>`,
	"unclosed":        `<body xmlns='http://jabber.org/protocol/httpbind'><message>`,
	"two roots":       okBody + okBody,
	"entity bomb":     `<!DOCTYPE b [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><body xmlns='http://jabber.org/protocol/httpbind'>&b;</body>`,
	"unknown entity":  `<body xmlns='http://jabber.org/protocol/httpbind'>&nbsp;</body>`,
	"proc inst":       `<?php x ?><body xmlns='http://jabber.org/protocol/httpbind'/>`,
	"trailing text":   okBody + "junk",
	"too deep":        `<body xmlns='http://jabber.org/protocol/httpbind'>` + strings.Repeat("<a>", 100) + strings.Repeat("</a>", 100) + `</body>`,
	"mismatched tags": `<body xmlns='http://jabber.org/protocol/httpbind'><a></b></body>`,
}

// checkBodies runs check over goodBodies and badBodies.
func checkBodies(t *testing.T, check func([]byte) error) {
	t.Helper()
	for _, b := range goodBodies {
		if err := check([]byte(b)); err != nil {
			t.Errorf("refused %q: %v", b, err)
		}
	}
	for name, b := range badBodies {
		if check([]byte(b)) == nil {
			t.Errorf("%s: accepted %q", name, b)
		}
	}
}

func TestCheckBody(t *testing.T) {
	checkBodies(t, func(b []byte) error { _, err := checkBody(b); return err })
}

func FuzzCheckBody(f *testing.F) {
	f.Add([]byte(okBody))
	f.Add([]byte(`<body xmlns='http://jabber.org/protocol/httpbind'><a>&amp;</a></body>`))
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = checkBody(b) })
}

// recordingBackend stands in for ejabberd in unit tests; the integration
// tests in test/ use the real one.
type recordingBackend struct {
	mu       sync.Mutex
	name     string
	reqs     []etf.BOSHRequest
	block    chan struct{}
	err      error
	detached atomic.Bool
	sids     atomic.Int64
}

func (b *recordingBackend) Peer() string   { return b.name }
func (b *recordingBackend) Attached() bool { return !b.detached.Load() }

func (b *recordingBackend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.reqs)
}

func (b *recordingBackend) ProcessBOSH(ctx context.Context, req etf.BOSHRequest) (etf.BOSHResponse, error) {
	b.mu.Lock()
	b.reqs = append(b.reqs, req)
	b.mu.Unlock()
	if b.block != nil {
		select {
		case <-b.block:
		case <-ctx.Done():
			return etf.BOSHResponse{}, ctx.Err()
		}
	}
	if b.err != nil {
		return etf.BOSHResponse{}, b.err
	}
	body := "<body xmlns='" + NS + "'/>"
	if info, _ := checkBody(req.Body); info.SID == "" {
		// A new session: answer with a sid that names this node.
		body = fmt.Sprintf("<body xmlns='%s' sid='%s-%d'/>", NS, b.name, b.sids.Add(1))
	} else if info.Terminate {
		body = "<body xmlns='" + NS + "' type='terminate'/>"
	}
	return etf.BOSHResponse{ConnID: req.ConnID, ReqID: req.ReqID, Status: 200, Reason: "OK",
		Headers: []etf.Header{{Name: "Content-Type", Value: "text/xml; charset=utf-8"}},
		Body:    []byte(body)}, nil
}

func serve(t *testing.T, nodes ...Node) string {
	t.Helper()
	url, _ := serveHandler(t, nodes...)
	return url
}

func serveHandler(t *testing.T, nodes ...Node) (string, *Handler) {
	t.Helper()
	return serveWithLimits(t, sockets.Limits{MaxBodyBytes: 1024}, nodes...)
}

func serveWithLimits(t *testing.T, limits sockets.Limits, nodes ...Node) (string, *Handler) {
	t.Helper()
	lis, err := sockets.Listen("127.0.0.1:0", sockets.NewRegistry(limits), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	h := NewHandler(Config{MaxWait: 2 * time.Second}, nodes...)
	srv := &http.Server{Handler: h, ConnContext: sockets.WithConn}
	go srv.Serve(lis)
	t.Cleanup(func() {
		srv.Close()
		http.DefaultClient.CloseIdleConnections() // goleak: no keep-alive readers left
	})
	return "http://" + lis.Addr().String() + "/bosh", h
}

func post(t *testing.T, url, body string) (*http.Response, string) {
	t.Helper()
	resp, err := http.Post(url, "text/xml", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestHandlerForwardsWithIDs(t *testing.T) {
	backend := &recordingBackend{}
	url := serve(t, backend)
	for i := 0; i < 3; i++ {
		resp, body := post(t, url, okBody)
		if resp.StatusCode != 200 || !strings.Contains(body, NS) {
			t.Fatalf("status %d body %q", resp.StatusCode, body)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Error("no CORS header on POST")
		}
	}
	backend.mu.Lock()
	defer backend.mu.Unlock()
	if len(backend.reqs) != 3 {
		t.Fatalf("%d requests forwarded", len(backend.reqs))
	}
	for i, r := range backend.reqs {
		if r.ConnID != backend.reqs[0].ConnID {
			t.Errorf("keep-alive requests got different connection ids")
		}
		if r.ReqID != uint64(i+1) || !r.Peer.Addr().IsLoopback() || string(r.Body) != okBody {
			t.Errorf("request %d: %+v", i, r)
		}
	}
}

func TestHandlerEdgeAnswers(t *testing.T) {
	backend := &recordingBackend{}
	url := serve(t, backend)

	req, _ := http.NewRequest(http.MethodOptions, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Methods") == "" {
		t.Fatalf("OPTIONS: %v %v", resp, err)
	}
	resp.Body.Close()
	resp, err = http.Get(url)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET: %v %v", resp, err)
	}
	resp.Body.Close()
	if resp, _ := post(t, url, strings.Repeat("x", 2000)); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %d", resp.StatusCode)
	}
	if resp, _ := post(t, url, "not xml"); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("non-XML body: %d", resp.StatusCode)
	}
	req, _ = http.NewRequest(http.MethodPut, url, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("PUT: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if len(backend.reqs) != 0 {
		t.Errorf("edge-answered requests reached the backend: %d", len(backend.reqs))
	}
	// And a good request still goes through on the same server.
	if resp, _ := post(t, url, okBody); resp.StatusCode != 200 {
		t.Errorf("good request after bad ones: %d", resp.StatusCode)
	}
}

func TestHandlerBackendDownGivesTerminate(t *testing.T) {
	url := serve(t, &recordingBackend{err: errors.New("not attached")})
	resp, body := post(t, url, okBody)
	if resp.StatusCode != 200 || !strings.Contains(body, "type='terminate'") ||
		!strings.Contains(body, "remote-connection-failed") {
		t.Fatalf("status %d body %q", resp.StatusCode, body)
	}
}

func TestHandlerTimeoutIs504(t *testing.T) {
	url := serve(t, &recordingBackend{block: make(chan struct{})})
	resp, _ := post(t, url, okBody)
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("status %d", resp.StatusCode)
	}
}

func TestIsEchoedRequest(t *testing.T) {
	req := `<body rid="17" sid="abc" xmlns="http://jabber.org/protocol/httpbind"><message id="m1" to="b@x" type="chat" xmlns="jabber:client"><body>a-&gt;b &lt;&amp;&gt; ünï</body></message></body>`
	// What ejabberd 23.01 answers with when it echoes: its own serialisation.
	echo := `<body xmlns='http://jabber.org/protocol/httpbind' rid='17' sid='abc'><message xmlns='jabber:client' type='chat' to='b@x' id='m1'><body>a-&gt;b &lt;&amp;&gt; ünï</body></message></body>`
	if !isEchoedRequest([]byte(req), []byte(echo)) {
		t.Error("echo not recognised")
	}
	// New stanzas inside the parked request's attributes: a real answer.
	fresh := `<body xmlns='http://jabber.org/protocol/httpbind' rid='17' sid='abc'><message xmlns='jabber:client' from='b@x/r' to='a@x' id='m9'><body>hi</body></message></body>`
	poll := `<body rid="18" sid="abc" xmlns="http://jabber.org/protocol/httpbind"/>`
	for _, tc := range []struct{ req, resp string }{
		{req, fresh},
		{poll, fresh},
		{req, `<body xmlns='http://jabber.org/protocol/httpbind'/>`},
		{req, `<body xmlns='http://jabber.org/protocol/httpbind' sid='abc' wait='60'><message from='b@x'/></body>`},
		{req, `<body type='terminate' condition='item-not-found' xmlns='http://jabber.org/protocol/httpbind'/>`},
		{req, ``}, {req, `not xml`},
	} {
		if isEchoedRequest([]byte(tc.req), []byte(tc.resp)) {
			t.Errorf("real answer %q taken for an echo of %q", tc.resp, tc.req)
		}
	}
	// An empty re-sent poll echoed is an empty answer either way.
	if !isEchoedRequest([]byte(poll), []byte(`<body xmlns='http://jabber.org/protocol/httpbind' rid='18' sid='abc'/>`)) {
		t.Error("echoed empty poll not recognised")
	}
}

// A cluster: new sessions alternate between attached nodes, every later
// request of a session goes to its owner, a detached node gets no new
// sessions, and a terminated session is forgotten.
func TestRouterPlacesAndPinsSessions(t *testing.T) {
	a, b := &recordingBackend{name: "a"}, &recordingBackend{name: "b"}
	url, h := serveHandler(t, a, b)
	sidRE := regexp.MustCompile(`sid='([^']+)'`)
	var sids []string
	for i := 0; i < 4; i++ {
		_, body := post(t, url, okBody)
		m := sidRE.FindStringSubmatch(body)
		if m == nil {
			t.Fatalf("no sid in %q", body)
		}
		sids = append(sids, m[1])
	}
	if a.count() != 2 || b.count() != 2 {
		t.Fatalf("sessions placed %d on a, %d on b; want 2 and 2", a.count(), b.count())
	}
	for _, sid := range sids {
		before := map[string]int{"a": a.count(), "b": b.count()}
		post(t, url, fmt.Sprintf("<body xmlns='%s' sid='%s' rid='2'/>", NS, sid))
		owner := sid[:1]
		after := map[string]int{"a": a.count(), "b": b.count()}
		if after[owner] != before[owner]+1 {
			t.Errorf("request of session %s did not go to node %s", sid, owner)
		}
	}
	b.detached.Store(true)
	for i := 0; i < 3; i++ {
		post(t, url, okBody)
	}
	if b.count() != 4 {
		t.Errorf("a detached node got new sessions (%d requests)", b.count())
	}
	if got := h.Sessions(); got["a"] != 5 || got["b"] != 2 {
		t.Errorf("sessions by node %v, want a:5 b:2", got)
	}
	post(t, url, fmt.Sprintf("<body xmlns='%s' sid='%s' rid='3' type='terminate'/>", NS, sids[0]))
	if got := h.Sessions(); got["a"]+got["b"] != 6 {
		t.Errorf("terminated session still routed: %v", got)
	}
}

// After a hot upgrade's handoff the old process's answers close their
// connection, that of a request held since before too; idle keep-alive
// connections stay open (closing one can lose a request the client is
// sending on it).
func TestHandlerClosesConnectionsAfterHandoff(t *testing.T) {
	backend := &recordingBackend{block: make(chan struct{})}
	url, h := serveHandler(t, backend)
	held := make(chan *http.Response, 1)
	go func() {
		resp, _ := post(t, url, okBody)
		held <- resp
	}()
	waitFor(t, "the held request", func() bool { return backend.count() == 1 })
	idle, err := net.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(url, "http://"), "/bosh"))
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()

	h.CloseConnections(true)
	close(backend.block)
	if resp := <-held; resp.StatusCode != 200 || !resp.Close {
		t.Errorf("the held request's answer (%d) keeps its connection open", resp.StatusCode)
	}
	if resp, _ := post(t, url, okBody); resp.StatusCode != 200 || !resp.Close {
		t.Errorf("a later answer (%d) keeps its connection open", resp.StatusCode)
	}
	// The idle connection still serves a request.
	fmt.Fprintf(idle, "POST /bosh HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(okBody), okBody)
	resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
	if err != nil || resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("a request on an idle connection after the handoff: %v %v", resp, err)
	}
	resp.Body.Close()

	h.CloseConnections(false) // the takeover failed
	if resp, _ := post(t, url, okBody); resp.Close {
		t.Error("answers still close their connection after CloseConnections(false)")
	}
}
