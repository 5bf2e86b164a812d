package bosh

import (
	"context"
	"strconv"
	"sync"
	"time"
)

// gapWait bounds how long a request waits for the requests of its session
// with lower rids to go out before it (ridOrder.enter). Those are normally
// a moment behind it, on another connection: the client sent them first.
const gapWait = time.Second

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
// session that it is about to send is on the link (the shim keeps that
// order into ejabberd_bosh, megaphone_sidecar), waiting at most gapWait
// for a missing rid: a gap that does not fill (a request lost on the way,
// or a session whose requests are spread over several sidecars) is left to
// ejabberd, and that session is not waited for again.
//
// A hot upgrade splits a session's requests over two processes: those the
// old process had read but not sent at the pause reach ejabberd later,
// through the new process's link, while the client sends its next ones to
// the new process. So the table moves with the takeover (handOver, adopt),
// and the old process reports each rid it still sends once the request is
// through (reportTo; the new process's sent): the new front holds the
// later requests until then, at most gapWait as for any gap.
type ridOrder struct {
	mu       sync.Mutex
	sessions map[string]*ridSeq
	enters   int

	// Once handed over, every rid sent is reported to the new process
	// (report), queued until report is set.
	handingOver bool
	queued      []sentRID
	report      func(sid string, rid uint64)
}

type sentRID struct {
	sid string
	rid uint64
}

type ridSeq struct {
	next      uint64        // the rid after the highest one sent
	moved     chan struct{} // closed when next moves
	unordered bool          // a gap did not fill: send as they come
	lastSeen  time.Time
}

func newRIDOrder() *ridOrder { return &ridOrder{sessions: make(map[string]*ridSeq)} }

// opened starts the order of a session the front has just opened with
// rid: the next request is rid+1.
func (o *ridOrder) opened(sid, rid string) {
	n, err := strconv.ParseUint(rid, 10, 64)
	if sid == "" || err != nil || n == ^uint64(0) {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.sessions[sid]; !ok {
		o.sessions[sid] = &ridSeq{next: n + 1, moved: make(chan struct{}), lastSeen: time.Now()}
	}
}

// forget drops a session that has ended.
func (o *ridOrder) forget(sid string) {
	o.mu.Lock()
	delete(o.sessions, sid)
	o.mu.Unlock()
}

// enter waits until the request with rid of session sid may go out: every
// lower rid the front has seen of it is out, or gapWait has passed. It
// returns the function to call once the request is on the link (more than
// once is fine), or ctx's error if ctx ends first. Requests without a
// session or a numeric rid are not ordered; neither are sessions the front
// did not open (opened before it started) and did not adopt at a takeover:
// it cannot know their next rid.
func (o *ridOrder) enter(ctx context.Context, sid, rid string) (sent func(), err error) {
	n, perr := strconv.ParseUint(rid, 10, 64)
	if sid == "" || perr != nil || n == ^uint64(0) {
		return func() {}, nil
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
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
			var once sync.Once
			return func() { once.Do(func() { o.sent(sid, n) }) }, nil
		}
		moved := s.moved
		o.mu.Unlock()
		if timer == nil {
			timer = time.NewTimer(gapWait)
		}
		select {
		case <-moved:
		case <-timer.C:
			o.mu.Lock()
			if s, ok := o.sessions[sid]; ok && n > s.next {
				s.unordered = true
			}
			o.mu.Unlock()
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// sent records that the request with rid is on the link, and wakes the
// requests waiting for it. After a handover snapshot it is reported to the
// new process too.
func (o *ridOrder) sent(sid string, rid uint64) {
	o.mu.Lock()
	s, ok := o.sessions[sid]
	if !ok || rid+1 <= s.next {
		o.mu.Unlock()
		return
	}
	s.next = rid + 1
	close(s.moved)
	s.moved = make(chan struct{})
	report := o.report
	if o.handingOver && report == nil {
		o.queued = append(o.queued, sentRID{sid, rid})
	}
	o.mu.Unlock()
	if report != nil {
		report(sid, rid)
	}
}

// SessionOrder is one BOSH session's place in its rid order, handed to the
// process that takes over at a hot upgrade.
type SessionOrder struct {
	SID string
	// Next is the rid after the highest one on the link.
	Next      uint64
	Unordered bool
}

// handOver returns every session's place, for a process taking over; from
// now on the rids this process sends are queued for reportTo. keep undoes it.
func (o *ridOrder) handOver() []SessionOrder {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.handingOver, o.queued = true, nil
	out := make([]SessionOrder, 0, len(o.sessions))
	for sid, s := range o.sessions {
		out = append(out, SessionOrder{SID: sid, Next: s.next, Unordered: s.unordered})
	}
	return out
}

// reportTo reports the rids sent since handOver, and every later one, to
// report (which may block: it runs on the request's goroutine, after the
// request is out). Reports may arrive out of order: a rid reported covers
// every lower one, so the new process keeps the highest.
func (o *ridOrder) reportTo(report func(sid string, rid uint64)) {
	o.mu.Lock()
	queued := o.queued
	o.queued, o.report = nil, report
	o.mu.Unlock()
	for _, q := range queued {
		report(q.sid, q.rid)
	}
}

// keep undoes handOver: the takeover failed, this process carries on alone.
func (o *ridOrder) keep() {
	o.mu.Lock()
	o.handingOver, o.queued = false, nil
	o.mu.Unlock()
}

// adopt carries on the order of the sessions of the process this one took
// over from; it runs before the first request.
func (o *ridOrder) adopt(sessions []SessionOrder) {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, s := range sessions {
		if _, ok := o.sessions[s.SID]; !ok && s.SID != "" {
			o.sessions[s.SID] = &ridSeq{next: s.Next, moved: make(chan struct{}), unordered: s.Unordered, lastSeen: now}
		}
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
