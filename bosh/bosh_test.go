package bosh

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

const okBody = `<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='localhost' wait='60' hold='1'/>`

func TestCheckBody(t *testing.T) {
	good := []string{
		okBody,
		`<?xml version='1.0'?><body xmlns='http://jabber.org/protocol/httpbind' sid='x' rid='2'><message xmlns='jabber:client' to='b@x'><body>&lt;&amp;&gt; ünï</body></message></body>`,
	}
	for _, b := range good {
		if err := checkBody([]byte(b)); err != nil {
			t.Errorf("refused %q: %v", b, err)
		}
	}
	bad := map[string]string{
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
	for name, b := range bad {
		if err := checkBody([]byte(b)); err == nil {
			t.Errorf("%s: accepted %q", name, b)
		}
	}
}

func FuzzCheckBody(f *testing.F) {
	f.Add([]byte(okBody))
	f.Add([]byte(`<body xmlns='http://jabber.org/protocol/httpbind'><a>&amp;</a></body>`))
	f.Fuzz(func(t *testing.T, b []byte) { _ = checkBody(b) })
}

// recordingBackend stands in for ejabberd in unit tests; the integration
// tests in test/ use the real one.
type recordingBackend struct {
	mu    sync.Mutex
	reqs  []etf.BOSHRequest
	block chan struct{}
	err   error
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
	return etf.BOSHResponse{ConnID: req.ConnID, ReqID: req.ReqID, Status: 200, Reason: "OK",
		Headers: []etf.Header{{Name: "Content-Type", Value: "text/xml; charset=utf-8"}},
		Body:    []byte("<body xmlns='" + NS + "'/>")}, nil
}

func serve(t *testing.T, backend Backend) string {
	t.Helper()
	lis, err := sockets.Listen("127.0.0.1:0", &sockets.IDs{}, sockets.Limits{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	h := NewHandler(Config{MaxBodyBytes: 1024, MaxWait: 2 * time.Second}, backend)
	srv := &http.Server{Handler: h, ConnContext: sockets.WithConn}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	return "http://" + lis.Addr().String() + "/bosh"
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
	resp, err = http.Get(url)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET: %v %v", resp, err)
	}
	if resp, _ := post(t, url, strings.Repeat("x", 2000)); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %d", resp.StatusCode)
	}
	if resp, _ := post(t, url, "not xml"); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("non-XML body: %d", resp.StatusCode)
	}
	req, _ = http.NewRequest(http.MethodPut, url, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("PUT: %v %v", resp, err)
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
