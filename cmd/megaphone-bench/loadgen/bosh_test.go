package loadgen

import (
	"context"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseBOSHReply(t *testing.T) {
	tests := []struct {
		name      string
		text      string
		want      boshReply
		wantError bool
	}{
		{name: "empty", text: `<body xmlns='http://jabber.org/protocol/httpbind'/>`},
		{name: "empty, double quotes", text: `<body xmlns="http://jabber.org/protocol/httpbind"></body>`},
		{name: "after an XML declaration", text: `<?xml version='1.0'?><body xmlns='x'/>`},
		{name: "a message",
			text: `<body xmlns='x'><message xmlns='jabber:client' to='b2@localhost' type='chat'><body>s:1</body></message></body>`,
			want: boshReply{payload: `<message xmlns='jabber:client' to='b2@localhost' type='chat'><body>s:1</body></message>`}},
		{name: "terminate", text: `<body type='terminate' condition='remote-stream-error' xmlns='x'/>`,
			want: boshReply{terminate: true, condition: "remote-stream-error"}},
		{name: "terminate, double quotes, no condition", text: `<body xmlns="x" type="terminate"></body>`,
			want: boshReply{terminate: true}},
		{name: "terminate with the stream's last words",
			text: `<body type='terminate' xmlns='x'><presence type='unavailable'/></body>`,
			want: boshReply{terminate: true, payload: `<presence type='unavailable'/>`}},
		{name: "a stanza's type is not the body's",
			text: `<body xmlns='x'><message type='terminate'><body>type='terminate'</body></message></body>`,
			want: boshReply{payload: `<message type='terminate'><body>type='terminate'</body></message>`}},
		{name: "a condition without terminate", text: `<body xmlns='x' condition='item-not-found'/>`},
		{name: "not BOSH", text: `<html>502</html>`, wantError: true},
		{name: "unfinished tag", text: `<body xmlns='x'`, wantError: true},
		{name: "unfinished body", text: `<body xmlns='x'><message>`, wantError: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseBOSHReply(tt.text)
			if (err != nil) != tt.wantError {
				t.Fatalf("error %v, want one: %v", err, tt.wantError)
			}
			if err == nil && got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

// A chat over fakeCM: every message arrives, in order; the sender keeps at
// most two requests out and its rids reach the server with no gap; the
// receiver uses one connection, the sender two; Close ends every reader.
func TestBOSHChat(t *testing.T) {
	cm := newFakeCM(t)
	d := NewDialer(1)
	sender, receiver := cm.login(t, d, "b1"), cm.login(t, d, "b2")
	if got := cm.conns.Load(); got != 2 {
		t.Fatalf("two idle sessions opened %d connections, want one each", got)
	}

	got := make(chan string, 100)
	received := make(chan error, 1)
	go func() { received <- receiver.Receive(func(body string) { got <- body }) }()
	const n = 50
	for i := 0; i < n; i++ {
		if err := sender.Send(ChatMessage("b2@localhost", strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
		expectDelivered(t, got, i)
	}
	// A burst: the sender waits for a free connection, nothing is lost.
	for i := n; i < 2*n; i++ {
		if err := sender.Send(ChatMessage("b2@localhost", strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := n; i < 2*n; i++ {
		expectDelivered(t, got, i)
	}
	if got := cm.conns.Load(); got != 3 {
		t.Fatalf("%d connections, want 3 (the sender's second one)", got)
	}
	if err := receiver.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-received:
		if err != nil {
			t.Fatalf("Receive after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Receive did not return after Close")
	}
	if err := sender.Close(); err != nil {
		t.Fatal(err)
	}
	if err := sender.Send(ChatMessage("b2@localhost", "late")); err == nil {
		t.Fatal("Send after Close succeeded")
	}
	// The receiver's one connection has its poll held: its terminate
	// needs a second one; the sender's goes on the free one of its two.
	if got := cm.conns.Load(); got != 4 {
		t.Fatalf("%d connections after the logouts, want 4", got)
	}
	cm.check(t, "b1", "b2")
	waitNoReaders(t)
}

// An idle session logs out on a second connection, as it always did.
func TestBOSHIdleClose(t *testing.T) {
	cm := newFakeCM(t)
	s := cm.login(t, NewDialer(1), "b1")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := cm.conns.Load(); got != 2 {
		t.Fatalf("%d connections, want the login's and the terminate's", got)
	}
	if err := s.Receive(func(string) {}); err != nil {
		t.Fatalf("Receive on a closed session: %v", err)
	}
	cm.check(t, "b1")
}

// A terminate from the server, or an HTTP error, ends Receive with an
// error, and Send fails after it.
func TestBOSHServerEnds(t *testing.T) {
	for _, tt := range []struct{ name, answer, want string }{
		{"terminate", "terminate", "remote-stream-error"},
		{"HTTP error", "404", "404"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cm := newFakeCM(t)
			s := cm.login(t, NewDialer(1), "b1")
			received := make(chan error, 1)
			go func() { received <- s.Receive(func(string) {}) }()
			time.Sleep(50 * time.Millisecond)
			cm.end("b1", tt.answer)
			select {
			case err := <-received:
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Receive: %v, want an error with %q", err, tt.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Receive did not end")
			}
			if err := s.Send(ChatMessage("b1@localhost", "x")); err == nil {
				t.Fatal("Send on an ended session succeeded")
			}
			s.Close()
			waitNoReaders(t)
		})
	}
}

func waitNoReaders(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for i := 0; ; i++ {
		stacks := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "(*boshSession).read") && !strings.Contains(stacks, "(*boshSession).deliver") {
			return
		}
		if i == 50 {
			t.Fatalf("BOSH readers still running:\n%s", stacks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fakeCM is a connection manager just big enough for loadgen's client:
// hold=1, the login's steps, chat messages routed between its users.
type fakeCM struct {
	srv   *httptest.Server
	conns atomic.Int64 // connections accepted

	mu       sync.Mutex
	sessions map[string]*fakeSession // by user
	bySID    map[string]*fakeSession
	nextSID  int
}

type fakeSession struct {
	user    string
	held    *fakeHeld
	queued  []string // stanzas for the client, none held to take them
	inside  int      // requests in the handler
	maxOut  int
	rids    []int64 // in the order they arrived
	endWith string  // the next answer ends the session: "terminate" or an HTTP status
}

type fakeHeld struct {
	rid    int64
	answer chan string
}

var (
	ridAttr  = regexp.MustCompile(`\srid=['"](\d+)['"]`)
	toAttr   = regexp.MustCompile(`<message to='([^@']+)@`)
	authText = regexp.MustCompile(`mechanism='PLAIN'>([^<]+)<`)
)

func newFakeCM(t *testing.T) *fakeCM {
	cm := &fakeCM{sessions: map[string]*fakeSession{}, bySID: map[string]*fakeSession{}}
	cm.srv = httptest.NewUnstartedServer(http.HandlerFunc(cm.serve))
	cm.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			cm.conns.Add(1)
		}
	}
	cm.srv.Start()
	t.Cleanup(cm.srv.Close)
	return cm
}

func (cm *fakeCM) login(t *testing.T, d *Dialer, user string) Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Login(ctx, d, Target{Kind: BOSH, Addr: cm.srv.Listener.Addr().String(), Path: "/bosh", Domain: "localhost"}, user, "pw")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// end makes user's held request (or next one) end the session.
func (cm *fakeCM) end(user, with string) {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	s := cm.sessions[user]
	s.endWith = with
	if s.held != nil {
		s.held.answer <- ""
		s.held = nil
	}
}

// check: each user's rids arrived in order without a gap, with at most
// two requests out at once.
func (cm *fakeCM) check(t *testing.T, users ...string) {
	t.Helper()
	cm.mu.Lock()
	defer cm.mu.Unlock()
	for _, u := range users {
		s := cm.sessions[u]
		if s.maxOut > 2 {
			t.Errorf("%s had %d requests out at once", u, s.maxOut)
		}
		seen := map[int64]bool{}
		lo, hi := s.rids[0], s.rids[0]
		for i, r := range s.rids {
			if i > 0 && r < s.rids[i-1] {
				t.Errorf("%s: rid %d arrived after %d", u, r, s.rids[i-1])
			}
			if seen[r] {
				t.Errorf("%s: rid %d sent twice", u, r)
			}
			seen[r] = true
			lo, hi = min(lo, r), max(hi, r)
		}
		if int(hi-lo+1) != len(s.rids) {
			t.Errorf("%s: %d rids from %d to %d: a gap: %v", u, len(s.rids), lo, hi, s.rids)
		}
	}
}

const fakeNS = " xmlns='http://jabber.org/protocol/httpbind'"

func (cm *fakeCM) serve(w http.ResponseWriter, r *http.Request) {
	raw, _ := io.ReadAll(r.Body)
	req := string(raw)
	m := ridAttr.FindStringSubmatch(req)
	if m == nil {
		http.Error(w, "no rid", http.StatusBadRequest)
		return
	}
	rid, _ := strconv.ParseInt(m[1], 10, 64)
	payload := ""
	if i := strings.IndexByte(req, '>'); i > 0 && req[i-1] != '/' {
		payload = strings.TrimSuffix(req[i+1:], "</body>")
	}
	write := func(answer string) {
		if code, err := strconv.Atoi(answer); err == nil {
			http.Error(w, "ended", code)
			return
		}
		_, _ = io.WriteString(w, answer)
	}

	cm.mu.Lock()
	sm := sidAttr.FindStringSubmatch(req)
	if sm == nil {
		cm.nextSID++
		sid := "sid" + strconv.Itoa(cm.nextSID)
		s := &fakeSession{rids: []int64{rid}}
		cm.bySID[sid] = s
		cm.mu.Unlock()
		write("<body sid='" + sid + "' wait='300' hold='1' requests='2'" + fakeNS + "><stream:features><mechanisms/></stream:features></body>")
		return
	}
	s := cm.bySID[sm[1]]
	s.rids = append(s.rids, rid)
	s.inside++
	s.maxOut = max(s.maxOut, s.inside)
	defer func() { cm.mu.Lock(); s.inside--; cm.mu.Unlock() }()
	var answer string
	switch {
	case strings.Contains(req, "type='terminate'"):
		if s.held != nil {
			s.held.answer <- "<body type='terminate' condition='other-request'" + fakeNS + "/>"
			s.held = nil
		}
		answer = "<body type='terminate'" + fakeNS + "/>"
	case strings.Contains(payload, "<auth"):
		creds, _ := base64.StdEncoding.DecodeString(authText.FindStringSubmatch(payload)[1])
		s.user = strings.Split(string(creds), "\x00")[1]
		cm.sessions[s.user] = s
		answer = "<body" + fakeNS + "><success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/></body>"
	case strings.Contains(req, "xmpp:restart='true'"):
		answer = "<body" + fakeNS + "><stream:features><bind/></stream:features></body>"
	case strings.Contains(payload, "<bind"):
		answer = "<body" + fakeNS + "><iq type='result' id='bind'><bind><jid>" + s.user + "@localhost/r</jid></bind></iq></body>"
	case payload == "<presence/>":
		answer = "<body" + fakeNS + "><presence from='" + s.user + "@localhost/r'/></body>"
	default:
		if to := toAttr.FindStringSubmatch(payload); to != nil {
			if peer := cm.sessions[to[1]]; peer != nil {
				peer.queued = append(peer.queued, payload)
				if peer.held != nil {
					peer.held.answer <- "<body" + fakeNS + ">" + strings.Join(peer.queued, "") + "</body>"
					peer.held, peer.queued = nil, nil
				}
			}
		}
		if len(s.queued) > 0 {
			answer = "<body" + fakeNS + ">" + strings.Join(s.queued, "") + "</body>"
			s.queued = nil
			break
		}
		// hold=1: the new request is held, the older one let go.
		if s.held != nil {
			s.held.answer <- "<body" + fakeNS + "/>"
		}
		h := &fakeHeld{rid: rid, answer: make(chan string, 1)}
		s.held = h
		cm.mu.Unlock()
		select {
		case answer = <-h.answer:
		case <-r.Context().Done():
			return
		case <-time.After(10 * time.Second):
			answer = "<body" + fakeNS + "/>"
		}
		cm.mu.Lock()
		if s.held == h {
			s.held = nil
		}
		if s.endWith != "" {
			answer = s.endWith
			if answer == "terminate" {
				answer = "<body type='terminate' condition='remote-stream-error'" + fakeNS + "/>"
			}
		}
		cm.mu.Unlock()
		write(answer)
		return
	}
	cm.mu.Unlock()
	write(answer)
}

// expectDelivered fails unless message i is the next one on got.
func expectDelivered(t *testing.T, got <-chan string, i int) {
	t.Helper()
	select {
	case body := <-got:
		if body != strconv.Itoa(i) {
			t.Fatalf("message %d arrived as %q", i, body)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("message %d not delivered", i)
	}
}
