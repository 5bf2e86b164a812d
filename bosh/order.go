package bosh

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// gapWait bounds how long a request waits for a lower rid of its session
// that the front has not seen (ridOrder.enter). Such a request is normally
// a moment behind it, on another connection: the client sent it first.
const gapWait = time.Second

// inFlightWait bounds how long a request waits for a lower rid of its
// session that is on its way to ejabberd: the link's write timeout (30 s)
// bounds that way already; this only keeps the wait finite if it does not.
const inFlightWait = 30 * time.Second

// ridOrder hands the requests of each BOSH session to ejabberd in rid
// order.
//
// Why: a client with hold=1 sends a new request on a second connection
// while its empty poll is held on the first, and both can leave it a moment
// apart (Tsung 1.7's BOSH client sends the poll, then at once the next
// stanza). Here they run on two goroutines, so rid N+1 (the poll) can reach
// the link after rid N+2. ejabberd_bosh (23.01 and 24.12) parks an early
// rid until the one before it arrives, but when that one is an empty poll
// it only holds it, and never goes back to the parked request: the stanza
// waits until the session ends. XEP-0124 expects the server to take a
// window of requests in any order; ejabberd's own listener loses that race
// too, but rarely, as its two connection processes each go straight to the
// session. So the front sends a request only once every lower rid of its
// session is on the link (the shim keeps that order into ejabberd_bosh,
// megaphone_bosh).
//
// A lower rid the front has (in flight: waiting its turn, or being written
// to the link) is waited for as long as it takes to go out, at most
// inFlightWait: under load a write to the link can take seconds, and a
// shorter bound sent the later request first, which stalled the session.
// A lower rid the front has not seen is waited for at most gapWait: a gap
// that does not fill (a request lost on the way, or a session whose
// requests are spread over several sidecars) is left to ejabberd, and that
// session is not waited for again.
//
// A hot upgrade splits a session's requests over two processes: those the
// old process holds at the pause reach ejabberd later, through the new
// process's link, while the client sends its next ones to the new process.
// So the table moves with the takeover, the old process's requests in
// flight with it (handOver, adopt), and from then on the old process
// reports what becomes of each of its requests (reportTo): entered, sent
// once it is through the relay, or dropped. The new front counts the old
// process's requests as in flight until then.
type ridOrder struct {
	mu       sync.Mutex
	sessions map[string]*ridSeq
	enters   int

	// Once handed over, every event of a session's request is reported to
	// the new process (report), queued until report is set. reportMu keeps
	// the reports of one request in order across the switch.
	handingOver atomic.Bool // set and cleared with mu held
	queued      []RIDEvent
	report      func(RIDEvent)
	reportMu    sync.Mutex
}

type ridSeq struct {
	next      uint64        // the rid after the highest one sent
	moved     chan struct{} // closed when next moves or a request leaves inFlight
	unordered bool          // a gap did not fill: send as they come
	lastSeen  time.Time
	inFlight  []flight // the session's requests on their way, a few at most
}

// flight is a request on its way to ejabberd: here, or (elsewhere) in the
// process this one took over from.
type flight struct {
	rid       uint64
	elsewhere bool
}

// RIDEventKind says what became of a request of the old process.
type RIDEventKind byte

// What the old process reports of each request of a session it handed over.
const (
	RIDOpened  RIDEventKind = 'O' // a session opened after the handover, with this rid
	RIDEntered RIDEventKind = 'E' // read after the handover: on its way
	RIDSent    RIDEventKind = 'S' // through the relay to ejabberd
	RIDDropped RIDEventKind = 'D' // given up before it went out
)

// RIDEvent is one report of the old process's (ReportTo, Elsewhere).
type RIDEvent struct {
	Kind RIDEventKind
	SID  string
	RID  uint64
}

func newRIDOrder() *ridOrder { return &ridOrder{sessions: make(map[string]*ridSeq)} }

// opened starts the order of a session the front has just opened with
// rid: the next request is rid+1.
func (o *ridOrder) opened(sid, rid string) {
	if n, err := strconv.ParseUint(rid, 10, 64); err == nil {
		o.open(sid, n)
	}
}

func (o *ridOrder) open(sid string, rid uint64) {
	if sid == "" || rid == ^uint64(0) {
		return
	}
	o.mu.Lock()
	_, known := o.sessions[sid]
	if !known {
		o.sessions[sid] = &ridSeq{next: rid + 1, moved: make(chan struct{}), lastSeen: time.Now()}
	}
	o.mu.Unlock()
	if !known {
		o.tell(RIDOpened, sid, rid)
	}
}

// forget drops a session that has ended.
func (o *ridOrder) forget(sid string) {
	o.mu.Lock()
	delete(o.sessions, sid)
	o.mu.Unlock()
}

// enter waits until the request with rid of session sid may go out: every
// lower rid of it is out, or (see ridOrder) the front has waited long
// enough for it. It returns the function to call once the request is on
// the link or has failed (more than once is fine), or ctx's error if ctx
// ends first. Requests without a session or a numeric rid are not ordered;
// neither are sessions the front did not open (opened before it started)
// and did not adopt at a takeover: it cannot know their next rid.
func (o *ridOrder) enter(ctx context.Context, sid, rid string) (sent func(), err error) {
	n, perr := strconv.ParseUint(rid, 10, 64)
	if sid == "" || perr != nil || n == ^uint64(0) {
		return func() {}, nil
	}
	o.mu.Lock()
	s, ok := o.sessions[sid]
	if !ok || s.unordered {
		o.mu.Unlock()
		return func() {}, nil
	}
	s.inFlight = append(s.inFlight, flight{rid: n})
	o.mu.Unlock()
	o.tell(RIDEntered, sid, n)
	var once sync.Once
	sent = func() { once.Do(func() { o.sent(sid, n, false) }) }
	if err := o.wait(ctx, sid, n); err != nil {
		once.Do(func() { o.drop(sid, n, false) })
		return nil, err
	}
	return sent, nil
}

// wait is enter's wait for the lower rids of rid n.
func (o *ridOrder) wait(ctx context.Context, sid string, n uint64) error {
	start := time.Now()
	var gapSince time.Time // since when no lower rid has been in flight
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	// Bounded: each turn ends with next moving, a request leaving the
	// session's flight (both finite), or a deadline that marks the
	// session unordered.
	for {
		now := time.Now()
		o.mu.Lock()
		o.sweep(now)
		s, ok := o.sessions[sid]
		if !ok || s.unordered || n <= s.next {
			if ok {
				s.lastSeen = now
			}
			o.mu.Unlock()
			return nil
		}
		var limit time.Time
		if s.lowerInFlight(n) {
			gapSince = time.Time{}
			limit = start.Add(inFlightWait)
		} else {
			if gapSince.IsZero() {
				gapSince = now
			}
			limit = gapSince.Add(gapWait)
		}
		if !now.Before(limit) {
			s.unordered = true
			o.mu.Unlock()
			return nil
		}
		moved := s.moved
		o.mu.Unlock()
		if timer == nil {
			timer = time.NewTimer(limit.Sub(now))
		} else {
			timer.Reset(limit.Sub(now))
		}
		select {
		case <-moved:
		case <-timer.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// lowerInFlight reports whether a rid between next and n is on its way.
func (s *ridSeq) lowerInFlight(n uint64) bool {
	for _, f := range s.inFlight {
		if f.rid >= s.next && f.rid < n {
			return true
		}
	}
	return false
}

// land takes one request with rid out of the session's flight, and those
// below next (retransmissions: no request waits for them), and wakes the
// requests waiting: they see next or the flight changed. Called with o.mu
// held.
func (s *ridSeq) land(rid uint64, elsewhere bool) {
	kept, found := s.inFlight[:0], false
	for _, f := range s.inFlight {
		if !found && f == (flight{rid, elsewhere}) {
			found = true // one of them: the same rid may be in flight twice
			continue
		}
		if f.rid >= s.next {
			kept = append(kept, f)
		}
	}
	s.inFlight = kept
	if len(kept) == 0 {
		s.inFlight = nil
	}
	close(s.moved)
	s.moved = make(chan struct{})
}

// sent records that the request with rid is on the link (here, or
// elsewhere: in the process this one took over from), and wakes the
// requests waiting for it.
func (o *ridOrder) sent(sid string, rid uint64, elsewhere bool) {
	o.mu.Lock()
	s, ok := o.sessions[sid]
	if ok {
		if rid+1 > s.next {
			s.next = rid + 1
		}
		s.land(rid, elsewhere)
	}
	o.mu.Unlock()
	if ok {
		o.tell(RIDSent, sid, rid)
	}
}

// drop takes a request that did not go out (its client went away while it
// waited) out of its session's flight.
func (o *ridOrder) drop(sid string, rid uint64, elsewhere bool) {
	o.mu.Lock()
	s, ok := o.sessions[sid]
	if ok {
		s.land(rid, elsewhere)
	}
	o.mu.Unlock()
	if ok {
		o.tell(RIDDropped, sid, rid)
	}
}

// elsewhere applies a report of the process this one took over from.
func (o *ridOrder) elsewhere(e RIDEvent) {
	switch e.Kind {
	case RIDOpened:
		o.open(e.SID, e.RID)
	case RIDEntered:
		o.mu.Lock()
		s, ok := o.sessions[e.SID]
		if ok && !s.unordered {
			s.inFlight = append(s.inFlight, flight{rid: e.RID, elsewhere: true})
		}
		o.mu.Unlock()
		if ok {
			o.tell(RIDEntered, e.SID, e.RID)
		}
	case RIDSent:
		o.sent(e.SID, e.RID, true)
	case RIDDropped:
		o.drop(e.SID, e.RID, true)
	}
}

// elsewhereEnded drops every request still counted in flight in the
// process this one took over from: that process has ended.
func (o *ridOrder) elsewhereEnded() {
	var gone []RIDEvent
	o.mu.Lock()
	for sid, s := range o.sessions {
		for _, f := range s.inFlight {
			if f.elsewhere {
				gone = append(gone, RIDEvent{RIDDropped, sid, f.rid})
			}
		}
	}
	o.mu.Unlock()
	for _, e := range gone {
		o.drop(e.SID, e.RID, true)
	}
}

// tell reports an event to the new process, once this one has handed over.
// report may block: it runs on the request's goroutine.
func (o *ridOrder) tell(kind RIDEventKind, sid string, rid uint64) {
	if !o.handingOver.Load() {
		return // the common case: no takeover
	}
	o.mu.Lock()
	report := o.report
	if report == nil {
		o.queued = append(o.queued, RIDEvent{kind, sid, rid})
	}
	o.mu.Unlock()
	if report != nil {
		o.reportMu.Lock()
		report(RIDEvent{kind, sid, rid})
		o.reportMu.Unlock()
	}
}

// SessionOrder is one BOSH session's place in its rid order, handed to the
// process that takes over at a hot upgrade.
type SessionOrder struct {
	SID string
	// Next is the rid after the highest one on the link.
	Next      uint64
	Unordered bool
	// InFlight are the rids of the requests on their way, which the old
	// process reports on.
	InFlight []uint64
}

// handOver returns every session's place, for a process taking over; from
// now on the events of each request are queued for reportTo. keep undoes
// it.
func (o *ridOrder) handOver() []SessionOrder {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.handingOver.Store(true)
	o.queued = nil
	out := make([]SessionOrder, 0, len(o.sessions))
	for sid, s := range o.sessions {
		so := SessionOrder{SID: sid, Next: s.next, Unordered: s.unordered}
		for _, f := range s.inFlight {
			so.InFlight = append(so.InFlight, f.rid)
		}
		out = append(out, so)
	}
	return out
}

// reportTo reports the events since handOver, and every later one, to
// report. Reports of one request come in order (entered, then sent or
// dropped); those of different requests need not.
func (o *ridOrder) reportTo(report func(RIDEvent)) {
	o.reportMu.Lock()
	defer o.reportMu.Unlock()
	o.mu.Lock()
	queued := o.queued
	o.queued, o.report = nil, report
	o.mu.Unlock()
	for _, e := range queued {
		report(e)
	}
}

// keep undoes handOver: the takeover failed, this process carries on alone.
func (o *ridOrder) keep() {
	o.mu.Lock()
	o.handingOver.Store(false)
	o.queued = nil
	o.mu.Unlock()
}

// adopt carries on the order of the sessions of the process this one took
// over from, its requests in flight included; it runs before the first
// request.
func (o *ridOrder) adopt(sessions []SessionOrder) {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, so := range sessions {
		if _, ok := o.sessions[so.SID]; ok || so.SID == "" {
			continue
		}
		s := &ridSeq{next: so.Next, moved: make(chan struct{}), unordered: so.Unordered, lastSeen: now}
		for _, rid := range so.InFlight {
			s.inFlight = append(s.inFlight, flight{rid: rid, elsewhere: true})
		}
		o.sessions[so.SID] = s
	}
}

// sweep drops, every 1024 requests, sessions not heard of for sessionTTL:
// those that ended by inactivity never say so. Called with mu held.
func (o *ridOrder) sweep(now time.Time) {
	if o.enters++; o.enters < 1024 {
		return
	}
	o.enters = 0
	for sid, s := range o.sessions {
		if now.Sub(s.lastSeen) > sessionTTL {
			delete(o.sessions, sid)
		}
	}
}
