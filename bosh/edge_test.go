package bosh

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// fakeC2S stands in for ejabberd_c2s in element mode: it answers each
// stream header with its own header and features, echoes nothing, and
// records what it is sent. The integration tests in test/ use the real one.
type fakeC2S struct {
	mu     sync.Mutex
	sink   sockets.StreamSink
	got    []string // names of what it was sent, in order
	closed bool
	open   etf.C2SOpen
}

func (c *fakeC2S) Send(events []etf.Term) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ev := range events {
		switch {
		case isEvent(ev, "xmlstreamstart"):
			c.got = append(c.got, "start:"+xmlstream.Attr(ev, "to"))
			if xmlstream.Attr(ev, "to") == "unknown.invalid" {
				go func() { // c2s's answer to a host it does not serve
					c.sink.Write(etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"),
						etf.List{etf.Tuple{[]byte("id"), []byte("s2")}}})
					c.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"),
						etf.Tuple{etf.Atom("xmlel"), []byte("stream:error"), etf.List{}, etf.List{
							etf.Tuple{etf.Atom("xmlel"), []byte("host-unknown"), etf.List{}, etf.List{}}}}})
					c.sink.Write(streamEnd())
					c.sink.Close("closed by ejabberd")
				}()
				continue
			}
			go func() { // as the link's reader would, later
				c.sink.Write(etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"),
					etf.List{etf.Tuple{[]byte("id"), []byte("s1")}, etf.Tuple{[]byte("version"), []byte("1.0")}}})
				c.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"),
					etf.Tuple{etf.Atom("xmlel"), []byte("stream:features"), etf.List{}, etf.List{}}})
			}()
		case isEvent(ev, "xmlstreamend"):
			c.got = append(c.got, "end")
		default:
			c.got = append(c.got, xmlstream.Name(ev)+":"+xmlstream.Attr(ev, "id"))
		}
	}
	return nil
}

func (c *fakeC2S) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}
func (c *fakeC2S) MaxStanzaBytes() int64 { return 0 }
func (c *fakeC2S) Describe() string      { return "fake" }

func (c *fakeC2S) received() ([]string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...), c.closed
}

type fakeStreams struct {
	mu  sync.Mutex
	all []*fakeC2S
}

func (f *fakeStreams) OpenStream(_ context.Context, open etf.C2SOpen, sink sockets.StreamSink) (sockets.Stream, error) {
	c := &fakeC2S{sink: sink, open: open}
	f.mu.Lock()
	f.all = append(f.all, c)
	f.mu.Unlock()
	return c, nil
}

func (f *fakeStreams) last() *fakeC2S {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.all[len(f.all)-1]
}

func serveEdge(t *testing.T, inactivity time.Duration) (string, *fakeStreams) {
	t.Helper()
	return serveEdgeWithLimits(t, inactivity, sockets.Limits{MaxBodyBytes: 4096})
}

func serveEdgeWithLimits(t *testing.T, inactivity time.Duration, limits sockets.Limits) (string, *fakeStreams) {
	t.Helper()
	url, streams, _ := serveEdgeHandler(t, inactivity, limits)
	return url, streams
}

func serveEdgeHandler(t *testing.T, inactivity time.Duration, limits sockets.Limits) (string, *fakeStreams, *Handler) {
	t.Helper()
	lis, err := sockets.Listen("127.0.0.1:0", sockets.NewRegistry(limits), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	streams := &fakeStreams{}
	h := NewHandler(Config{MaxWait: 10 * time.Second, Edge: EdgeConfig{Streams: streams, Inactivity: inactivity}})
	srv := &http.Server{Handler: h, ConnContext: sockets.WithConn}
	go srv.Serve(lis)
	t.Cleanup(func() {
		h.Shutdown()
		srv.Close()
		http.DefaultClient.CloseIdleConnections()
	})
	return "http://" + lis.Addr().String() + "/bosh", streams, h
}

var sidRE = regexp.MustCompile(`sid='([0-9a-f]+)'`)

func edgeCreate(t *testing.T, url string) string {
	t.Helper()
	_, body := post(t, url, `<body xmlns='`+NS+`' rid='100' to='localhost' wait='2' hold='1' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>`)
	for _, want := range []string{"authid='s1'", "<stream:features", "requests='2'", "xmpp:version='1.0'", "hold='1'", "wait='2'"} {
		if !strings.Contains(body, want) {
			t.Fatalf("creation answer %q lacks %q", body, want)
		}
	}
	return sidRE.FindStringSubmatch(body)[1]
}

func edgeBody(sid string, rid int, extra, payload string) string {
	return fmt.Sprintf(`<body xmlns='%s' sid='%s' rid='%d' %s>%s</body>`, NS, sid, rid, extra, payload)
}

func TestEdgeSessionChatRestartTerminate(t *testing.T) {
	url, streams := serveEdge(t, time.Minute)
	sid := edgeCreate(t, url)
	c2s := streams.last()
	if c2s.open.Transport != "http_bind" {
		t.Fatalf("transport %q", c2s.open.Transport)
	}
	// A held poll gets what c2s writes, stanzas in jabber:client.
	polled := make(chan string, 1)
	go func() { _, b := post(t, url, edgeBody(sid, 101, "", "")); polled <- b }()
	time.Sleep(100 * time.Millisecond)
	c2s.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"),
		etf.Tuple{etf.Atom("xmlel"), []byte("message"), etf.List{etf.Tuple{[]byte("id"), []byte("m1")}}, etf.List{}}})
	if b := <-polled; !strings.Contains(b, `<message id="m1" xmlns="jabber:client"/>`) && !strings.Contains(b, `<message id='m1' xmlns='jabber:client'/>`) {
		t.Fatalf("poll got %q", b)
	}
	// Out of order: 103 waits for 102, and c2s gets them in rid order.
	late := make(chan string, 1)
	go func() { _, b := post(t, url, edgeBody(sid, 103, "", "<message id='b'/>")); late <- b }()
	time.Sleep(200 * time.Millisecond)
	_, b := post(t, url, edgeBody(sid, 102, "", "<message id='a'/>"))
	if !strings.Contains(b, "<body") {
		t.Fatalf("102 got %q", b)
	}
	<-late
	// A restart gets fresh features.
	_, b = post(t, url, edgeBody(sid, 104, "xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh' to='localhost'", ""))
	if !strings.Contains(b, "<stream:features") {
		t.Fatalf("restart got %q", b)
	}
	// A re-sent rid gets the same answer.
	if _, again := post(t, url, edgeBody(sid, 104, "", "")); again != b {
		t.Fatalf("re-sent rid got %q, first %q", again, b)
	}
	_, b = post(t, url, edgeBody(sid, 105, "type='terminate'", "<presence type='unavailable'/>"))
	if !strings.Contains(b, "type='terminate'") {
		t.Fatalf("terminate got %q", b)
	}
	got, closed := c2s.received()
	want := []string{"start:localhost", "message:a", "message:b", "start:localhost", "presence:", "end"}
	if fmt.Sprint(got) != fmt.Sprint(want) || !closed {
		t.Fatalf("c2s got %v (closed %v), want %v closed", got, closed, want)
	}
	if _, b := post(t, url, edgeBody(sid, 106, "", "")); !strings.Contains(b, "condition='item-not-found'") {
		t.Fatalf("after terminate: %q", b)
	}
}

func TestEdgeSessionErrors(t *testing.T) {
	url, streams := serveEdge(t, 500*time.Millisecond)
	if _, b := post(t, url, edgeBody("nosuchsid", 5, "", "")); !strings.Contains(b, "condition='item-not-found'") {
		t.Fatalf("unknown sid: %q", b)
	}
	if _, b := post(t, url, `<body xmlns='`+NS+`' rid='1' wait='2'/>`); !strings.Contains(b, "condition='improper-addressing'") {
		t.Fatalf("no to: %q", b)
	}
	if resp, _ := post(t, url, `<body xmlns='`+NS+`' rid='x' to='localhost'/>`); resp.StatusCode != 400 {
		t.Fatalf("bad rid: status %d", resp.StatusCode)
	}
	sid := edgeCreate(t, url)
	if _, b := post(t, url, edgeBody(sid, 150, "", "")); !strings.Contains(b, "condition='item-not-found'") {
		t.Fatalf("rid out of the window: %q", b)
	}
	if _, closed := streams.last().received(); !closed {
		t.Fatal("c2s not closed after a bad rid")
	}
	// Inactivity ends the session and its c2s.
	edgeCreate(t, url)
	c2s := streams.last()
	deadline := time.Now().Add(5 * time.Second)
	for _, closed := c2s.received(); !closed; _, closed = c2s.received() {
		if time.Now().After(deadline) {
			t.Fatal("inactive session's c2s not closed")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A stream error from c2s ends the session with remote-stream-error,
// carrying the error, even with no request held when it comes.
func TestEdgeSessionStreamError(t *testing.T) {
	url, streams := serveEdge(t, time.Minute)
	sid := edgeCreate(t, url)
	c2s := streams.last()
	c2s.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"),
		etf.Tuple{etf.Atom("xmlel"), []byte("stream:error"), etf.List{}, etf.List{
			etf.Tuple{etf.Atom("xmlel"), []byte("conflict"), etf.List{etf.Tuple{[]byte("xmlns"), []byte("urn:ietf:params:xml:ns:xmpp-streams")}}, etf.List{}}}}})
	c2s.sink.Write(streamEnd())
	c2s.sink.Close("closed by ejabberd")
	_, b := post(t, url, edgeBody(sid, 101, "", ""))
	if !strings.Contains(b, "condition='remote-stream-error'") || !strings.Contains(b, "<conflict") {
		t.Fatalf("after a stream error: %q", b)
	}
}

// A session over --max-bosh-requests-per-sec is cut with policy-violation,
// its c2s closed, and it keeps answering policy-violation.
func TestEdgeSessionOverRateIsCut(t *testing.T) {
	url, streams := serveEdgeWithLimits(t, time.Minute, sockets.Limits{MaxBodyBytes: 4096, MaxBOSHRequestsPerSec: 3})
	sid := edgeCreate(t, url)
	answers := make(chan string, 10)
	for rid := 101; rid <= 110; rid++ {
		go func() { _, b := post(t, url, edgeBody(sid, rid, "", "")); answers <- b }()
		time.Sleep(20 * time.Millisecond) // in rid order, 50 a second
	}
	cut := 0
	for range 10 {
		if strings.Contains(<-answers, "policy-violation") {
			cut++
		}
	}
	if cut == 0 {
		t.Fatal("10 requests at 50 a second with a limit of 3 a second were never cut")
	}
	if _, closed := streams.last().received(); !closed {
		t.Error("the cut session's c2s is still open")
	}
	if _, b := post(t, url, edgeBody(sid, 111, "", "")); !strings.Contains(b, "policy-violation") {
		t.Errorf("the cut session's next request got %q", b)
	}
}

// A session for a host ejabberd does not serve, from a client without
// xmpp:version: the creation answer is the terminate with c2s's error,
// not the stream header alone.
func TestEdgeSessionUnknownHost(t *testing.T) {
	url, _ := serveEdge(t, time.Minute)
	_, b := post(t, url, `<body xmlns='`+NS+`' rid='7' to='unknown.invalid' wait='5' hold='1'/>`)
	if !strings.Contains(b, "type='terminate'") || !strings.Contains(b, "<host-unknown") || !strings.Contains(b, "authid='s2'") {
		t.Fatalf("creation for an unknown host: %q", b)
	}
}

// A held request is parked off net/http; a request the client pipelined
// behind it on the same connection is kept, and read once the held one is
// answered, on the connection handed back to HTTP.
func TestEdgeParkedConnectionKeepsPipelinedRequest(t *testing.T) {
	url, streams := serveEdge(t, time.Minute)
	_, created := post(t, url, `<body xmlns='`+NS+`' rid='100' to='localhost' wait='1' hold='1' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>`)
	sid := sidRE.FindStringSubmatch(created)[1]
	addr := strings.TrimSuffix(strings.TrimPrefix(url, "http://"), "/bosh")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := func(rid int, payload string) string {
		b := edgeBody(sid, rid, "", payload)
		return fmt.Sprintf("POST /bosh HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s", len(b), b)
	}
	if _, err := io.WriteString(c, req(101, "")+req(102, "<message id='piped'/>")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	for i := 0; i < 2; i++ {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), "<body") || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Fatalf("answer %d: %d %q %v", i, resp.StatusCode, body, resp.Header)
		}
	}
	if got, _ := streams.last().received(); !slices.Contains(got, "message:piped") {
		t.Fatalf("c2s got %v, not the pipelined message", got)
	}
}

// A held request answered within parkAfter is answered by net/http, as
// any request: the creation (c2s's features come at once) and a poll a
// stanza answers at once are never parked. A poll that waits longer (here
// until its session's wait of 2 s runs out) is.
func TestEdgeAnswerSoonIsNotParked(t *testing.T) {
	url, streams, h := serveEdgeHandler(t, time.Minute, sockets.Limits{MaxBodyBytes: 4096})
	parkedAny := func() bool {
		h.edge.parking.mu.Lock()
		defer h.edge.parking.mu.Unlock()
		return h.edge.parking.server != nil
	}
	sid := edgeCreate(t, url)
	c2s := streams.last()
	polled := make(chan string, 1)
	go func() { _, b := post(t, url, edgeBody(sid, 101, "", "")); polled <- b }()
	time.Sleep(h.edge.cfg.parkAfter / 4)
	c2s.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"),
		etf.Tuple{etf.Atom("xmlel"), []byte("message"), etf.List{etf.Tuple{[]byte("id"), []byte("soon")}}, etf.List{}}})
	if b := <-polled; !strings.Contains(b, "soon") {
		t.Fatalf("poll got %q", b)
	}
	if parkedAny() {
		t.Fatal("a request answered within parkAfter was parked")
	}
	if _, b := post(t, url, edgeBody(sid, 102, "", "")); b != emptyBody {
		t.Fatalf("a poll that ran out its wait got %q", b)
	}
	if !parkedAny() {
		t.Fatal("a poll held for its whole wait was not parked")
	}
}

// A polling session (wait=0, hold=0): each request is answered at once,
// and one sooner than `polling` seconds after the last is overactivity.
func TestEdgePollingSession(t *testing.T) {
	url, streams := serveEdge(t, time.Minute)
	_, created := post(t, url, `<body xmlns='`+NS+`' rid='10' to='localhost' wait='0' hold='0' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>`)
	if !strings.Contains(created, "requests='1'") || !strings.Contains(created, "wait='0'") {
		t.Fatalf("creation of a polling session: %q", created)
	}
	sid := sidRE.FindStringSubmatch(created)[1]
	// As ejabberd_bosh: with wait=0 the creation is answered at once, and
	// c2s's header and features come with it or with the next poll.
	time.Sleep(edgePolling * time.Second)
	start := time.Now()
	if _, b := post(t, url, edgeBody(sid, 11, "", "")); !strings.Contains(created+b, "<stream:features") || time.Since(start) > time.Second {
		t.Fatalf("a poll: %q after %s (creation %q)", b, time.Since(start), created)
	}
	if _, b := post(t, url, edgeBody(sid, 12, "", "")); !strings.Contains(b, "condition='policy-violation'") {
		t.Fatalf("a poll too soon: %q", b)
	}
	if _, closed := streams.last().received(); !closed {
		t.Error("the overactive session's c2s is still open")
	}
}

// A request ahead of a gap that never fills ends with the session, by
// inactivity, answered with a terminate; its c2s is closed.
func TestEdgeUnfilledGapEndsByInactivity(t *testing.T) {
	url, streams := serveEdge(t, 500*time.Millisecond)
	sid := edgeCreate(t, url)
	start := time.Now()
	if _, b := post(t, url, edgeBody(sid, 102, "", "<message id='lonely'/>")); !strings.Contains(b, "type='terminate'") || time.Since(start) > 5*time.Second {
		t.Fatalf("a request ahead of a gap: %q after %s", b, time.Since(start))
	}
	got, closed := streams.last().received()
	if !closed || slices.Contains(got, "message:lonely") {
		t.Fatalf("c2s got %v (closed %v): want it closed, without the request past the gap", got, closed)
	}
}

// parseEdgeRequest is the only check an edge request's body gets: it must
// refuse all that checkBody refuses.
func TestParseEdgeRequestChecksTheBody(t *testing.T) {
	checkBodies(t, func(b []byte) error { _, err := parseEdgeRequest(b); return err })
	for name, b := range map[string]string{
		"prefixed root": `<b:body xmlns:b='` + NS + `' rid='1'/>`,
		"comment":       `<body xmlns='` + NS + `' rid='1'><!-- x --></body>`,
	} {
		if _, err := parseEdgeRequest([]byte(b)); err == nil {
			t.Errorf("%s: accepted %q", name, b)
		}
	}
}

// FuzzEdgeRequestNoLaxerThanCheckBody: whatever body the edge path
// accepts, checkBody accepts too, so that serving BOSH at the edge never
// lets through what relay mode refuses.
func FuzzEdgeRequestNoLaxerThanCheckBody(f *testing.F) {
	for _, b := range goodBodies {
		f.Add([]byte(b))
	}
	for _, b := range badBodies {
		f.Add([]byte(b))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := parseEdgeRequest(b); err != nil {
			return
		}
		if _, err := checkBody(b); err != nil {
			t.Fatalf("the edge accepted what checkBody refuses (%v): %q", err, b)
		}
	})
}
