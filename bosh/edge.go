package bosh

import (
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// Edge mode (--bosh-mode edge): the sidecar keeps the BOSH session itself
// (XEP-0124, XEP-0206) and ejabberd keeps only the session's ejabberd_c2s,
// in element mode on the shim's virtual socket, which reports transport
// http_bind so c2s behaves as it does under ejabberd_bosh. A session then
// costs ejabberd one process instead of three (ejabberd_bosh's fsm, c2s,
// and the shim's worker blocked in ejabberd_bosh for the held long-poll).
//
// The session follows ejabberd_bosh (checked against its source, 23.01 to
// 24.12) wherever a client could tell the difference: the creation
// answer's attributes, wait capped at 300 s and hold at 1, requests =
// hold+1, the rid window (a rid past it ends the session with
// item-not-found), key sequences, the restart, the answers to stanzas'
// namespaces, stream errors as remote-stream-error terminates, and the
// answers it keeps for a re-sent rid.

// ejabberd_bosh's fixed values.
const (
	edgeMaxWait = 300 // seconds
	edgeMaxHold = 1
	edgePolling = 2 // seconds: the shortest poll interval a polling session may use
	edgeVersion = "1.11"

	nsXBOSH  = "urn:xmpp:xbosh"
	nsStream = "http://etherx.jabber.org/streams"
	nsClient = "jabber:client"
)

// EdgeConfig tunes BOSH sessions served at the edge.
type EdgeConfig struct {
	// Streams opens the c2s stream of each session; nil means the front
	// runs in relay mode (every request goes to ejabberd_bosh).
	Streams sockets.StreamBackend
	// Inactivity is how long a session may go without a request before
	// it ends (mod_bosh's max_inactivity); 0 means 30 s.
	Inactivity time.Duration
	// MaxPause is the longest pause a client may ask for (mod_bosh's
	// max_pause); 0 means 120 s.
	MaxPause time.Duration
	// maxWait is the front's MaxWait: a session's wait is at most that
	// (and 300 s), so --max-wait bounds a held request in both modes.
	maxWait time.Duration
	// parkAfter is how long a held request waits in net/http before it
	// is parked (edgepark.go); 0 means defaultParkAfter.
	parkAfter time.Duration
}

// defaultParkAfter: a held request whose answer comes this soon is
// answered by net/http itself, as any request, and never parked. Parking
// saves an idle session's goroutine and buffers, but costs a hijack, a
// goroutine to write the answer and a new net/http connection to read
// the next request on the same socket; a session in the middle of an
// exchange (a login's round trips, a chat) gets its answer within
// milliseconds, and only one that really waits should pay that.
const defaultParkAfter = 100 * time.Millisecond

// edgeFront is the table of the sessions served at the edge.
type edgeFront struct {
	cfg EdgeConfig
	log *zap.Logger

	mu       sync.Mutex
	sessions map[string]*edgeSession

	created, ended, overactive atomic.Uint64
	parking                    parking // held requests taken from net/http (edgepark.go)
}

func newEdgeFront(cfg EdgeConfig, log *zap.Logger) *edgeFront {
	if cfg.Inactivity <= 0 {
		cfg.Inactivity = 30 * time.Second
	}
	if cfg.MaxPause <= 0 {
		cfg.MaxPause = 120 * time.Second
	}
	if cfg.parkAfter <= 0 {
		cfg.parkAfter = defaultParkAfter
	}
	return &edgeFront{cfg: cfg, log: log, sessions: make(map[string]*edgeSession)}
}

// edgeAnswer is what one HTTP request gets: an answer now, or (waiter
// set) an answer to wait for (edgeSession.await) or to park the request
// for (edgeFront.park).
type edgeAnswer struct {
	status  int
	body    []byte
	session *edgeSession
	waiter  *edgeWaiter
}

func okAnswer(body []byte) edgeAnswer { return edgeAnswer{status: 200, body: body} }

// terminateAnswer ends a session (or refuses one) with a BOSH condition,
// as ejabberd_bosh does: HTTP 200 and a terminate body.
func terminateAnswer(condition string) edgeAnswer {
	return okAnswer([]byte(fmt.Sprintf("<body xmlns='%s' type='terminate' condition='%s'/>", NS, condition)))
}

// edgeRequest is one request body, read.
type edgeRequest struct {
	rid         uint64
	sid, to     string
	typ         string // "terminate" or ""
	key, newKey string
	restart     bool
	xmppVersion string
	wait, hold  int // -1: not given
	pause       int // 0: none
	ack         bool
	els         []etf.Term // the payload: #xmlel{} terms
	size        int
}

// parseEdgeRequest checks and reads a request body in one pass. It is the
// only parse an edge request gets: it refuses all that checkBody refuses
// (one element, the BOSH <body/> in its namespace, no DTD, processing
// instruction or undefined entity, no deeper than maxDepth; tested
// against checkBody's cases and by FuzzEdgeRequestNoLaxerThanCheckBody),
// and also comments. Parsing the body twice, with checkBody first, was
// 9-13% of what the edge path allocated in a chat, and its sidecar CPU a
// message fell by 12% without it (BENCH.md, "BOSH at the edge: one parse
// a request").
func parseEdgeRequest(body []byte) (edgeRequest, error) {
	req := edgeRequest{wait: -1, hold: -1, size: len(body)}
	el, err := xmlstream.ParseElement(body, xmlstream.Limits{MaxStanzaBytes: int64(len(body)) + 1, MaxDepth: maxDepth})
	if err != nil {
		return req, fmt.Errorf("%w: %v", errBadBody, err)
	}
	if xmlstream.Name(el) != "body" || xmlstream.Attr(el, "xmlns") != NS {
		return req, fmt.Errorf("%w: root is not <body xmlns='%s'/>", errBadBody, NS)
	}
	rid, err := strconv.ParseUint(xmlstream.Attr(el, "rid"), 10, 64)
	if err != nil {
		return req, fmt.Errorf("%w: missing or invalid rid", errBadBody)
	}
	req.rid = rid
	req.sid = xmlstream.Attr(el, "sid")
	req.to = xmlstream.Attr(el, "to")
	req.typ = xmlstream.Attr(el, "type")
	req.key = xmlstream.Attr(el, "key")
	req.newKey = xmlstream.Attr(el, "newkey")
	req.xmppVersion = xmlstream.Attr(el, "xmpp:version")
	switch xmlstream.Attr(el, "xmpp:restart") {
	case "true", "1":
		req.restart = true
	}
	req.ack = xmlstream.Attr(el, "ack") != ""
	for _, a := range []struct {
		name string
		to   *int
	}{{"wait", &req.wait}, {"hold", &req.hold}, {"pause", &req.pause}} {
		if v := xmlstream.Attr(el, a.name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return req, fmt.Errorf("%w: invalid %s", errBadBody, a.name)
			}
			*a.to = n
		}
	}
	if children, ok := el.(etf.Tuple)[3].(etf.List); ok {
		for _, c := range children {
			if xmlstream.Name(c) != "" {
				req.els = append(req.els, c)
			}
		}
	}
	return req, nil
}

// serve answers one request of an edge session, or creates one.
// A session over perSec requests a second (0: no limit) is cut with a
// policy-violation terminate, and its c2s closed.
func (f *edgeFront) serve(ctx context.Context, conn *sockets.Conn, peer netip.AddrPort, req edgeRequest, perSec int) edgeAnswer {
	if req.sid == "" {
		return f.create(ctx, conn, peer, req)
	}
	f.mu.Lock()
	s := f.sessions[req.sid]
	f.mu.Unlock()
	if s == nil {
		return terminateAnswer("item-not-found")
	}
	if perSec > 0 && !s.admit(perSec) {
		f.overactive.Add(1)
		return terminateAnswer("policy-violation")
	}
	return s.handle(req)
}

// edgeOpenWait bounds how long a session creation waits for ejabberd to
// start its c2s.
const edgeOpenWait = 10 * time.Second

func (f *edgeFront) create(ctx context.Context, conn *sockets.Conn, peer netip.AddrPort, req edgeRequest) edgeAnswer {
	if req.to == "" {
		return terminateAnswer("improper-addressing")
	}
	wait, hold := min(edgeMaxWait, max(1, int(f.cfg.maxWait/time.Second))), edgeMaxHold
	if req.wait >= 0 {
		wait = min(req.wait, wait)
	}
	if req.hold >= 0 {
		hold = min(req.hold, edgeMaxHold)
	}
	s := &edgeSession{
		front: f, sid: newSID(), host: req.to, xmppVersion: req.xmppVersion,
		wait: time.Duration(wait) * time.Second, hold: hold, requests: hold + 1,
		polling:    wait == 0 && hold == 0,
		inactivity: f.cfg.Inactivity, acks: req.ack,
		prevRID: req.rid, highRID: req.rid, key: req.newKey,
	}
	if s.polling {
		s.lastPoll = time.Now()
	}
	local, _ := netip.ParseAddrPort(conn.LocalAddr().String())
	openCtx, cancel := context.WithTimeout(ctx, edgeOpenWait)
	st, err := f.cfg.Streams.OpenStream(openCtx, etf.C2SOpen{ConnID: conn.NewStreamID(), Transport: "http_bind",
		Peer: peer, Local: local}, s)
	cancel()
	if err != nil {
		f.log.Debug("BOSH session not opened", zap.Uint64("conn", conn.ID), zap.Error(err))
		var netErr net.Error
		if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &netErr) {
			return terminateAnswer("remote-connection-failed")
		}
		if ctx.Err() != nil {
			return edgeAnswer{} // the client has gone
		}
		return terminateAnswer("remote-connection-failed")
	}
	s.mu.Lock()
	s.stream = st
	f.mu.Lock()
	f.sessions[s.sid] = s
	f.mu.Unlock()
	f.created.Add(1)
	w := s.newWaiter(req.rid)
	w.create = true
	// The stream header c2s expects first, as ejabberd_bosh makes it.
	s.inQ = append(s.inQ, streamStart(req.to, req.xmppVersion))
	s.hold1(w)
	s.mu.Unlock()
	s.flushIn()
	return edgeAnswer{session: s, waiter: w}
}

// Sessions returns how many sessions are open at the edge.
func (f *edgeFront) open() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.sessions)
}

func (f *edgeFront) remove(s *edgeSession) {
	f.mu.Lock()
	if f.sessions[s.sid] == s {
		delete(f.sessions, s.sid)
		f.ended.Add(1)
	}
	f.mu.Unlock()
}

// shutdown ends every session with a system-shutdown terminate: the
// sidecar is going away, and their c2s processes with it.
func (f *edgeFront) shutdown() {
	f.mu.Lock()
	all := make([]*edgeSession, 0, len(f.sessions))
	for _, s := range f.sessions {
		all = append(all, s)
	}
	f.mu.Unlock()
	for _, s := range all {
		s.endByServer("system-shutdown", true)
	}
	f.parking.stop()
}

func newSID() string {
	var b [20]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// streamStart is the stream header c2s gets for a new or restarted BOSH
// stream (ejabberd_bosh's make_xmlstreamstart).
func streamStart(to, version string) etf.Term {
	attrs := etf.List{
		etf.Tuple{[]byte("to"), []byte(to)},
		etf.Tuple{[]byte("xmlns"), []byte(nsClient)},
		etf.Tuple{[]byte("xmlns:xmpp"), []byte(nsXBOSH)},
		etf.Tuple{[]byte("xmlns:stream"), []byte(nsStream)},
	}
	if version != "" {
		attrs = append(attrs, etf.Tuple{[]byte("version"), []byte(version)})
	}
	return etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"), attrs}
}

func streamEnd() etf.Term { return etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")} }

// validKey checks a request's key against the last newkey (XEP-0124 §15):
// SHA-1 of the key, in hex, must be the previous key.
func validKey(prev, key string) bool {
	if prev == "" {
		return key == ""
	}
	sum := sha1.Sum([]byte(key))
	return hex.EncodeToString(sum[:]) == prev
}
