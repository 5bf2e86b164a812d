package sockets

import (
	"sync"
	"time"
)

// outbox is one client connection's queue of what ejabberd writes to it,
// written in order by at most one writer goroutine at a time. The writer
// exists only while there is something to write: push starts it, and it
// ends once the queue is empty, so an idle stream has no writer (a parked
// writer goroutine costs its stack, ~3 KiB, measured in
// docs/EVENTLOOP.md). It is bounded: the link to ejabberd must never wait
// for a slow client, and a client that reads slower than ejabberd writes
// must not cost unbounded memory, so past the limit the connection is
// dropped (overflow) rather than the data.
type outbox struct {
	limit  int
	client outboxClient

	mu      sync.Mutex
	pending [][]byte
	size    int
	closing bool
	done    bool // the connection was closed (closeConn): nothing more is written
	running bool // a writer goroutine is draining the queue
	// detaching stops the writer without closing the connection: it moves
	// to a new sidecar process (handoff.go).
	detaching bool
	idle      chan struct{} // closed when the running writer exits; made by whoever waits
}

// outboxClient is the connection an outbox writes to. An interface rather
// than three funcs: method values would be three more allocations per
// stream.
type outboxClient interface {
	write(b []byte) error // writes one message to the client
	overflow()            // called once, when the limit is passed
	closeConn()           // called once, when closed and flushed or a write failed
}

func newOutbox(limit int, client outboxClient) *outbox {
	return &outbox{limit: limit, client: client}
}

// push queues one message; after close it is ignored.
func (o *outbox) push(b []byte) {
	o.mu.Lock()
	if o.closing {
		o.mu.Unlock()
		return
	}
	o.pending = append(o.pending, b)
	o.size += len(b)
	over := o.size > o.limit
	if over {
		o.closing, o.pending, o.size = true, nil, 0
	}
	o.startWriterLocked()
	o.mu.Unlock()
	if over {
		o.client.overflow()
	}
}

// close lets the writer flush what is queued, then end.
func (o *outbox) close() {
	o.mu.Lock()
	o.closing = true
	o.startWriterLocked()
	o.mu.Unlock()
}

// startWriterLocked starts a writer if there is work and none runs.
func (o *outbox) startWriterLocked() {
	if o.running || o.detaching || o.done || (len(o.pending) == 0 && !o.closing) {
		return
	}
	o.running = true
	go o.run()
}

func (o *outbox) isClosing() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.closing
}

// drain takes what is queued, for a caller that writes it itself.
func (o *outbox) drain() [][]byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := o.pending
	o.pending, o.size = nil, 0
	return out
}

// run is the writer: it writes each message in order until the queue is
// empty, and closes the connection when the outbox is closed and flushed or a
// write fails.
func (o *outbox) run() {
	for {
		o.mu.Lock()
		if o.detaching {
			o.exitLocked()
			o.mu.Unlock()
			return
		}
		out := o.pending
		o.pending, o.size = nil, 0
		if len(out) == 0 {
			finish := o.closing && !o.done
			o.done = o.done || finish
			o.exitLocked()
			o.mu.Unlock()
			if finish {
				o.client.closeConn()
			}
			return
		}
		o.mu.Unlock()
		for i, m := range out {
			if o.requeueIfDetaching(out[i:]) {
				break // the next round sees detaching and exits
			}
			if err := o.client.write(m); err != nil {
				o.mu.Lock()
				o.closing, o.done, o.pending, o.size = true, true, nil, 0
				o.exitLocked()
				o.mu.Unlock()
				o.client.closeConn()
				return
			}
		}
	}
}

// exitLocked marks the writer gone and wakes whoever waits for that.
func (o *outbox) exitLocked() {
	o.running = false
	if o.idle != nil {
		close(o.idle)
		o.idle = nil
	}
}

// waitIdle waits until no writer runs, at most limit (0: as long as it
// takes); it reports whether none does.
func (o *outbox) waitIdle(limit time.Duration) bool {
	o.mu.Lock()
	if !o.running {
		o.mu.Unlock()
		return true
	}
	if o.idle == nil {
		o.idle = make(chan struct{})
	}
	idle := o.idle
	o.mu.Unlock()
	if limit <= 0 {
		<-idle
		return true
	}
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-idle:
		return true
	case <-t.C:
		return false
	}
}

// shutdown closes the outbox and waits for the writer to flush it
// (bounded by the write deadline the write function sets).
func (o *outbox) shutdown() {
	o.close()
	o.waitIdle(0)
}

// detach stops the writer after the message it is writing, without
// closing the connection, and returns what it has not written. It gives
// up after limit (a client that does not read holds the writer in a
// write); the writer then carries on.
func (o *outbox) detach(limit time.Duration) ([][]byte, bool) {
	o.mu.Lock()
	o.detaching = true
	o.mu.Unlock()
	if !o.waitIdle(limit) {
		o.mu.Lock()
		o.detaching = false
		o.startWriterLocked() // in case it stopped just now
		o.mu.Unlock()
		return nil, false
	}
	return o.drain(), true
}

func (o *outbox) isDetached() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.detaching
}

// requeueIfDetaching puts rest back at the head of the queue if the writer
// is to stop, and reports whether it is.
func (o *outbox) requeueIfDetaching(rest [][]byte) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.detaching {
		return false
	}
	o.pending = append(append([][]byte(nil), rest...), o.pending...)
	for _, m := range rest {
		o.size += len(m)
	}
	return true
}

// reattach lets a detached outbox write again, with pending at the head of
// the queue (a takeover that failed).
func (o *outbox) reattach(pending [][]byte) {
	o.mu.Lock()
	o.pending = append(append([][]byte(nil), pending...), o.pending...)
	for _, m := range pending {
		o.size += len(m)
	}
	o.detaching = false
	o.startWriterLocked()
	o.mu.Unlock()
}
