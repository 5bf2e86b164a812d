package bosh

import (
	"bytes"
	"context"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"github.com/megaphone-im/megaphone/xmlstream"
)

// edgeSession is one BOSH session served at the edge, and the sink of its
// c2s stream: what c2s writes waits in out until a held request takes it.
//
// Locking: mu guards the state; it is held only briefly, never while
// writing to the link (a busy link must not hold up the link's reader,
// which delivers c2s's output here). Input for c2s is queued in inQ under
// mu and sent by flushIn under sendMu, which keeps it in rid order.
type edgeSession struct {
	front *edgeFront
	sid   string
	host  string
	// xmppVersion is the client's xmpp:version: with 1.0 or later, c2s's
	// stream header is answered together with the features that follow.
	xmppVersion    string
	wait           time.Duration
	hold, requests int
	polling        bool // wait=0 and hold=0: requests must be edgePolling apart
	inactivity     time.Duration
	acks           bool

	stream sockets.Stream
	sendMu sync.Mutex

	mu sync.Mutex
	// prevRID is the last rid processed, highRID the highest seen.
	prevRID, highRID uint64
	key              string
	lastPoll         time.Time
	held             []*edgeWaiter          // processed requests waiting for output, in rid order
	parked           map[uint64]*edgeWaiter // requests ahead of prevRID+1, waiting for the gap to fill (made on first use)
	out              []etf.Term             // c2s's output not yet answered
	inQ              []etf.Term             // input for c2s not yet sent
	closeAfterInput  bool                   // close the c2s stream once inQ is sent
	// responses keeps the answers a client may still ask again for (a
	// re-sent rid): those within requests of prevRID. An idle session
	// keeps one, so a slice, each body copied to its exact size.
	responses []keptAnswer
	ended     bool
	headerDue bool        // a lone stream header of a stream without a version has waited headerGrace
	rate      requestRate // the request allowance (--max-bosh-requests-per-sec); rate.cut: ended for going over it
	final     []byte      // the terminate for the client's next request, when none was held as the session ended
	inactive  *time.Timer
}

type keptAnswer struct {
	rid  uint64
	body []byte
}

// kept returns the answer kept for rid, or nil.
func (s *edgeSession) kept(rid uint64) []byte {
	for _, k := range s.responses {
		if k.rid == rid {
			return k.body
		}
	}
	return nil
}

// edgeWaiter is one HTTP request of a session, waiting for its answer.
type edgeWaiter struct {
	rid    uint64
	req    *edgeRequest // set while parked
	create bool         // its answer carries the session's attributes
	ch     chan []byte  // the answer; room for one
	timer  *time.Timer  // the wait timer while held
	done   bool         // answered
	// onAnswer, once the request is parked (edgepark.go), takes the
	// answer instead of ch; it must not block.
	onAnswer func(body []byte)
	gone     bool // its client hung up; the answer is only kept for a re-send
}

// give hands the request its answer. The session's mu is held.
func (w *edgeWaiter) give(body []byte) {
	if w.onAnswer != nil {
		w.onAnswer(body)
		return
	}
	w.ch <- body
}

func (s *edgeSession) newWaiter(rid uint64) *edgeWaiter {
	return &edgeWaiter{rid: rid, ch: make(chan []byte, 1)}
}

// handle runs one request of the session and returns its answer.
func (s *edgeSession) handle(req edgeRequest) edgeAnswer {
	s.mu.Lock()
	if s.ended && s.rate.cut {
		s.mu.Unlock()
		return terminateAnswer("policy-violation")
	}
	if s.ended {
		// The session ended while no request was held: its terminate
		// (with c2s's last words) goes to this request.
		final := s.final
		s.mu.Unlock()
		s.front.remove(s)
		if final == nil {
			return terminateAnswer("item-not-found")
		}
		return okAnswer(final)
	}
	if limit := s.stream.MaxStanzaBytes(); limit > 0 && int64(req.size) > limit {
		// As ejabberd_bosh: a body over c2s's max_stanza_size is refused.
		s.mu.Unlock()
		return edgeAnswer{status: 403, body: []byte("Request Too Large\n")}
	}
	s.highRID = max(s.highRID, req.rid)
	var w *edgeWaiter
	switch {
	case req.rid > s.prevRID+uint64(s.requests):
		s.mu.Unlock()
		return s.endByClientError("item-not-found")
	case req.rid <= s.prevRID:
		if body := s.kept(req.rid); body != nil {
			s.mu.Unlock()
			return okAnswer(body) // a re-send: the same answer again
		}
		i := slices.IndexFunc(s.held, func(h *edgeWaiter) bool { return h.rid == req.rid })
		if i < 0 {
			s.mu.Unlock()
			return s.endByClientError("item-not-found")
		}
		// A re-send of a held request (its connection dropped): this
		// one waits in its place.
		old := s.held[i]
		w = s.newWaiter(req.rid)
		w.create, w.timer = old.create, old.timer
		old.timer = nil
		s.held[i] = w
		old.done = true
		old.give([]byte(emptyBody))
		if w.timer != nil {
			w.timer.Stop()
			s.startWaitTimer(w)
		}
	case req.rid > s.prevRID+1:
		w = s.newWaiter(req.rid)
		w.req = &req
		if prev := s.parked[req.rid]; prev != nil {
			prev.done = true
			prev.give([]byte(emptyBody))
		}
		if s.parked == nil {
			s.parked = make(map[uint64]*edgeWaiter)
		}
		s.parked[req.rid] = w
		// As ejabberd_bosh: a gap that does not fill within the
		// inactivity period ends the session (and answers this one).
		if len(s.held) == 0 {
			s.startInactivity(s.inactivity)
		}
	default:
		w = s.newWaiter(req.rid)
		s.process(req, w)
		for !s.ended {
			next := s.parked[s.prevRID+1]
			if next == nil {
				break
			}
			delete(s.parked, next.rid)
			s.process(*next.req, next)
			next.req = nil
		}
	}
	s.mu.Unlock()
	s.flushIn()
	return edgeAnswer{session: s, waiter: w}
}

// admit takes one request from the session's allowance of perSec a
// second. The first request over it ends the session (its c2s closed);
// the session then answers policy-violation until it leaves the table
// (after the inactivity period).
func (s *edgeSession) admit(perSec int) bool {
	s.mu.Lock()
	ok, cutNow := s.rate.take(perSec, time.Now())
	if cutNow && !s.ended {
		s.final = terminateAnswer("policy-violation").body
		s.closeAfterInput = true
		s.finish()
	}
	s.mu.Unlock()
	if cutNow {
		s.flushIn()
	}
	return ok
}

// process takes the request that is next in rid order. mu is held.
func (s *edgeSession) process(req edgeRequest, w *edgeWaiter) {
	if !validKey(s.key, req.key) {
		s.endLocked(w, "item-not-found")
		return
	}
	now := time.Now()
	if s.polling && now.Sub(s.lastPoll) < edgePolling*time.Second {
		s.endLocked(w, "policy-violation")
		return
	}
	s.lastPoll = now
	if req.newKey != "" {
		s.key = req.newKey
	} else {
		s.key = req.key
	}
	s.prevRID = req.rid
	s.stopInactivity()
	if req.restart {
		to, version := req.to, req.xmppVersion
		if to == "" {
			to = s.host
		}
		if version == "" {
			version = s.xmppVersion
		}
		s.inQ = append(s.inQ, streamStart(to, version))
	} else {
		s.inQ = append(s.inQ, req.els...)
	}
	switch {
	case req.typ == "terminate":
		// The client ends the session: c2s gets the stream's end (after
		// the payload), then the close; this request gets what c2s had
		// written, and the held ones an empty terminate.
		s.inQ = append(s.inQ, streamEnd())
		s.closeAfterInput = true
		s.answer(w, s.body(w, nil, true), true)
		s.finish()
	case req.pause > 0:
		// XEP-0124 §10: every request is answered now, and the session
		// waits up to the pause for the next.
		pause := min(time.Duration(req.pause)*time.Second, s.front.cfg.MaxPause)
		for len(s.held) > 0 {
			s.release(s.held[0])
		}
		s.answer(w, s.body(w, nil, false), false)
		s.startInactivity(pause)
	default:
		s.hold1(w)
	}
}

// hold1 makes w a held request, answering the ones over hold and any
// output waiting. The creation request is always held: its answer waits
// for c2s's stream header and features, as in ejabberd_bosh. mu is held.
func (s *edgeSession) hold1(w *edgeWaiter) {
	i, _ := slices.BinarySearchFunc(s.held, w.rid, func(h *edgeWaiter, rid uint64) int {
		return cmpU64(h.rid, rid)
	})
	s.held = slices.Insert(s.held, i, w)
	s.startWaitTimer(w)
	for len(s.held) > s.hold && !(len(s.held) == 1 && w.create) {
		s.release(s.held[0])
	}
	s.deliver()
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (s *edgeSession) startWaitTimer(w *edgeWaiter) {
	w.timer = time.AfterFunc(s.wait, func() {
		s.mu.Lock()
		if !w.done && !s.ended {
			s.release(w)
		}
		s.mu.Unlock()
	})
}

// deliver answers the oldest held request if c2s's output is ready.
// mu is held.
func (s *edgeSession) deliver() {
	if len(s.held) > 0 && s.outReady() {
		s.release(s.held[0])
	}
}

// outReady says whether out is worth an answer. A stream header alone
// waits for what c2s sends next: the features (XMPP 1.0), as in
// ejabberd_bosh; for a stream without a version, which gets no features,
// a moment (headerGrace), so that a stream error c2s sends at once (an
// unknown host) comes in the same answer, as a terminate.
func (s *edgeSession) outReady() bool {
	for _, ev := range s.out {
		if !isEvent(ev, "xmlstreamstart") {
			return true
		}
	}
	return len(s.out) > 0 && s.headerDue
}

// headerGrace is how long a lone stream header of a stream without a
// version waits for more of c2s's output: c2s writes a stream error right
// after the header, in the same turn.
const headerGrace = 20 * time.Millisecond

// release answers a held request with what c2s has written (perhaps
// nothing). mu is held.
func (s *edgeSession) release(w *edgeWaiter) {
	var out []etf.Term
	if s.outReady() {
		out, s.out, s.headerDue = s.out, nil, false
	}
	s.answer(w, s.body(w, out, false), false)
}

// answer hands w its answer and keeps it for a re-send. mu is held.
func (s *edgeSession) answer(w *edgeWaiter, body []byte, terminate bool) {
	if w.done {
		return
	}
	w.done = true
	if w.timer != nil {
		w.timer.Stop()
	}
	if i := slices.Index(s.held, w); i >= 0 {
		s.held = slices.Delete(s.held, i, i+1)
	}
	// A client may ask again for an answer until it sends a rid requests
	// past it: it can have only requests outstanding, so by then it has
	// the answer.
	s.responses = slices.DeleteFunc(s.responses, func(k keptAnswer) bool {
		return k.rid+uint64(s.requests) <= s.prevRID || k.rid == w.rid
	})
	s.responses = append(s.responses, keptAnswer{rid: w.rid, body: bytes.Clone(body)})
	w.give(body)
	if !terminate && !s.ended && len(s.held) == 0 && s.inactive == nil {
		s.startInactivity(s.inactivity)
	}
}

// answerWithin waits up to d for w's answer, while its client stays. It
// takes nothing else: a request not answered by then is parked or
// awaited as before, and its answer stays in ch for that.
func (w *edgeWaiter) answerWithin(ctx context.Context, d time.Duration) ([]byte, bool) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case body := <-w.ch:
		return body, true
	case <-t.C:
	case <-ctx.Done():
	}
	return nil, false
}

// await waits for w's answer, or for its client to hang up.
func (s *edgeSession) await(ctx context.Context, w *edgeWaiter) edgeAnswer {
	select {
	case body := <-w.ch:
		return okAnswer(body)
	case <-ctx.Done():
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case body := <-w.ch:
		return okAnswer(body) // answered as the client left: kept for its re-send too
	default:
	}
	if s.parked[w.rid] == w {
		// Not taken yet: the client sends it again.
		delete(s.parked, w.rid)
	} else {
		// Taken: its answer is kept for the client's re-send, and
		// until then the request counts as held.
		w.gone = true
	}
	return edgeAnswer{}
}

func (s *edgeSession) stopInactivity() {
	if s.inactive != nil {
		s.inactive.Stop()
		s.inactive = nil
	}
}

// startInactivity ends the session if no request comes within d.
func (s *edgeSession) startInactivity(d time.Duration) {
	s.stopInactivity()
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		s.mu.Lock()
		if s.inactive != t {
			s.mu.Unlock()
			return
		}
		s.inactive = nil
		wasEnded := s.ended
		if !wasEnded {
			s.finish() // requests still waiting for a gap get the terminate
		}
		s.mu.Unlock()
		s.front.remove(s)
		if !wasEnded {
			// The client is gone: c2s ends as when a socket closes.
			s.stream.Close()
		}
	})
	s.inactive = t
}

// flushIn sends c2s what requests have queued, in order.
func (s *edgeSession) flushIn() {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.mu.Lock()
	in, closeAfter := s.inQ, s.closeAfterInput
	s.inQ, s.closeAfterInput = nil, false
	s.mu.Unlock()
	if len(in) > 0 {
		if err := s.stream.Send(in); err != nil {
			s.endByServer("remote-connection-failed", true)
			return
		}
	}
	if closeAfter {
		s.stream.Close()
	}
}

// endByClientError ends the session for a request it cannot take.
func (s *edgeSession) endByClientError(condition string) edgeAnswer {
	s.mu.Lock()
	s.endLocked(nil, condition)
	s.mu.Unlock()
	s.flushIn()
	return terminateAnswer(condition)
}

// endLocked ends the session for a client's error: w (if any) and every
// waiting request get the terminate, c2s its stream's close. mu is held.
func (s *edgeSession) endLocked(w *edgeWaiter, condition string) {
	if w != nil {
		s.answer(w, terminateAnswer(condition).body, true)
	}
	s.closeAfterInput = true
	s.finish()
}

// finish ends the session: what still waits gets an empty terminate. A
// terminate kept for the client's next request (final) keeps the session
// in the table for the inactivity period; otherwise it leaves now. mu is
// held.
func (s *edgeSession) finish() {
	s.ended = true
	s.stopInactivity()
	end := []byte(`<body xmlns='` + NS + `' type='terminate'/>`)
	for _, w := range append(slices.Clone(s.held), mapValues(s.parked)...) {
		s.answer(w, end, true)
	}
	clear(s.parked)
	if s.final != nil {
		s.startInactivity(s.inactivity)
	} else {
		s.front.remove(s)
	}
}

func mapValues(m map[uint64]*edgeWaiter) []*edgeWaiter {
	out := make([]*edgeWaiter, 0, len(m))
	for _, w := range m {
		out = append(out, w)
	}
	return out
}

// endByServer ends the session from ejabberd's side (c2s closed, a stream
// error, the link down, a shutdown) with a terminate of the condition,
// carrying what c2s wrote last. With no request held, the terminate waits
// for the client's next request, for the inactivity period at most.
// closeStream closes c2s too (it is still running).
func (s *edgeSession) endByServer(condition string, closeStream bool) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	out := s.out
	s.out = nil
	if len(s.held) > 0 {
		w := s.held[0]
		s.answer(w, s.body(w, out, true, "condition", condition), true)
	} else {
		s.final = s.body(nil, out, true, "condition", condition)
	}
	s.finish()
	s.mu.Unlock()
	if closeStream {
		s.stream.Close()
	}
}

// body builds an answer: the session's attributes for its creation
// request, then c2s's output as ejabberd_bosh encodes it (the stream
// header gives authid and xmpp:version; a stream error or end makes it a
// remote-stream-error terminate; stanzas get jabber:client, since the
// body's own namespace would otherwise be theirs). extra are attribute
// pairs that override. mu is held.
func (s *edgeSession) body(w *edgeWaiter, out []etf.Term, terminate bool, extra ...string) []byte {
	var a attrList
	a.set("xmlns", NS)
	if w != nil && w.create {
		a.set("sid", s.sid)
		a.set("wait", strconv.Itoa(int(s.wait/time.Second)))
		a.set("ver", edgeVersion)
		a.set("polling", strconv.Itoa(edgePolling))
		a.set("inactivity", strconv.Itoa(int(s.inactivity/time.Second)))
		a.set("hold", strconv.Itoa(s.hold))
		a.set("xmpp:restartlogic", "true")
		a.set("requests", strconv.Itoa(s.requests))
		a.set("secure", "true")
		a.set("maxpause", strconv.Itoa(int(s.front.cfg.MaxPause/time.Second)))
		a.set("xmlns:xmpp", nsXBOSH)
		a.set("xmlns:stream", nsStream)
		a.set("from", s.host)
		if s.acks {
			a.set("ack", strconv.FormatUint(w.rid, 10))
		}
	} else if w != nil && s.acks && w.rid < s.highRID {
		a.set("ack", strconv.FormatUint(s.highRID, 10))
	}
	if terminate {
		a.set("type", "terminate")
	}
	var payload []byte
	for _, ev := range out {
		t, _ := ev.(etf.Tuple)
		switch {
		case isEvent(ev, "xmlstreamstart"):
			if v := xmlstream.Attr(ev, "version"); v != "" {
				a.set("xmpp:version", v)
				a.set("xmlns:xmpp", nsXBOSH)
			}
			a.set("authid", xmlstream.Attr(ev, "id"))
		case isEvent(ev, "xmlstreamend"):
			a.set("type", "terminate")
			a.set("condition", "remote-stream-error")
		case isEvent(ev, "xmlstreamelement") && len(t) == 2:
			el := t[1]
			switch xmlstream.Name(el) {
			case "stream:error":
				a.set("type", "terminate")
				a.set("condition", "remote-stream-error")
				a.set("xmlns:stream", nsStream)
			case "stream:features":
				a.set("xmlns:stream", nsStream)
			case "message", "presence", "iq":
				el = withClientNS(el)
			}
			payload, _ = xmlstream.AppendElement(payload, el)
		case isEvent(ev, "xmlstreamraw") && len(t) == 2:
			if raw, ok := t[1].([]byte); ok {
				payload = append(payload, raw...)
			}
		}
	}
	for i := 0; i+1 < len(extra); i += 2 {
		if a.get(extra[i]) == "" || extra[i] != "condition" {
			a.set(extra[i], extra[i+1])
		}
	}
	b := []byte("<body")
	for _, kv := range a {
		b = append(b, ' ')
		b = append(b, kv[0]...)
		b = append(b, "='"...)
		b = append(b, xmlstream.EscapeAttr(kv[1])...)
		b = append(b, '\'')
	}
	if len(payload) == 0 {
		return append(b, "/>"...)
	}
	b = append(b, '>')
	b = append(b, payload...)
	return append(b, "</body>"...)
}

// withClientNS gives a stanza c2s wrote the jabber:client namespace
// (replacing any), as ejabberd_bosh does.
func withClientNS(el etf.Term) etf.Term {
	t := slices.Clone(el.(etf.Tuple))
	attrs, _ := t[2].(etf.List)
	out := make(etf.List, 0, len(attrs)+1)
	for _, kv := range attrs {
		if p, ok := kv.(etf.Tuple); ok && len(p) == 2 {
			if k, _ := p[0].([]byte); string(k) == "xmlns" {
				continue
			}
		}
		out = append(out, kv)
	}
	t[2] = append(out, etf.Tuple{[]byte("xmlns"), []byte(nsClient)})
	return t
}

func isEvent(ev etf.Term, kind string) bool {
	t, ok := ev.(etf.Tuple)
	return ok && len(t) >= 2 && t[0] == etf.Atom(kind)
}

// attrList keeps attributes in order, a later set replacing the value.
type attrList [][2]string

func (a *attrList) set(k, v string) {
	for i := range *a {
		if (*a)[i][0] == k {
			(*a)[i][1] = v
			return
		}
	}
	*a = append(*a, [2]string{k, v})
}

func (a attrList) get(k string) string {
	for _, kv := range a {
		if kv[0] == k {
			return kv[1]
		}
	}
	return ""
}

// The session is its c2s stream's sink (sockets.StreamSink); these run on
// the link's reader goroutine and never block on a client.

// Write takes one event c2s wrote.
func (s *edgeSession) Write(ev etf.Term) {
	if isEvent(ev, "xmlstreamend") || (isEvent(ev, "xmlstreamelement") && xmlstream.Name(ev.(etf.Tuple)[1]) == "stream:error") {
		s.mu.Lock()
		s.out = append(s.out, ev)
		s.mu.Unlock()
		s.endByServer("remote-stream-error", false)
		return
	}
	s.mu.Lock()
	if !s.ended {
		s.out = append(s.out, ev)
		if isEvent(ev, "xmlstreamstart") && s.xmppVersion < "1.0" {
			time.AfterFunc(headerGrace, func() {
				s.mu.Lock()
				if !s.ended {
					s.headerDue = true
					s.deliver()
				}
				s.mu.Unlock()
			})
		}
		s.deliver()
	}
	s.mu.Unlock()
}

// Close says c2s has ended the stream.
func (s *edgeSession) Close(string) { s.endByServer("remote-connection-failed", false) }

// Abort says ejabberd can no longer serve the session.
func (s *edgeSession) Abort(condition string) {
	if condition != "system-shutdown" {
		condition = "remote-connection-failed"
	}
	s.endByServer(condition, false)
}

// Shape is c2s's shaper; BOSH requests are not read by rate here.
func (s *edgeSession) Shape(int64) {}
