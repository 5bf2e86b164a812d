package sockets

import "sync"

// outbox is one client connection's queue of what ejabberd writes to it,
// drained in order by one writer goroutine. It is bounded: the link to
// ejabberd must never wait for a slow client, and a client that reads
// slower than ejabberd writes must not cost unbounded memory, so past the
// limit the connection is dropped (overflow) rather than the data.
type outbox struct {
	limit    int
	overflow func() // called once, when the limit is passed

	mu      sync.Mutex
	pending [][]byte
	size    int
	closing bool
	// detaching stops the writer without closing the connection: it moves
	// to a new sidecar process (handoff.go).
	detaching bool
	wake      chan struct{}
	finished  chan struct{}
}

func newOutbox(limit int, overflow func()) *outbox {
	return &outbox{limit: limit, overflow: overflow, wake: make(chan struct{}, 1), finished: make(chan struct{})}
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
	o.mu.Unlock()
	if over {
		o.overflow()
	}
	o.signal()
}

// close lets the writer flush what is queued, then end.
func (o *outbox) close() {
	o.mu.Lock()
	o.closing = true
	o.mu.Unlock()
	o.signal()
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

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// run is the writer: it writes each message in order, and calls finish
// when the outbox is closed and flushed or a write fails.
func (o *outbox) run(write func([]byte) error, finish func()) {
	defer close(o.finished)
	for {
		<-o.wake
		o.mu.Lock()
		if o.detaching {
			o.mu.Unlock()
			return
		}
		out, closing := o.pending, o.closing
		o.pending, o.size = nil, 0
		o.mu.Unlock()
		for i, m := range out {
			if o.requeueIfDetaching(out[i:]) {
				return
			}
			if err := write(m); err != nil {
				finish()
				return
			}
		}
		if closing {
			finish()
			return
		}
	}
}

// shutdown closes the outbox and waits for the writer to finish (bounded
// by the write deadline the write function sets).
func (o *outbox) shutdown() {
	o.close()
	<-o.finished
}
