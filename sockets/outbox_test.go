package sockets

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// recorder is a client that the test can hold up.
type recorder struct {
	mu      sync.Mutex
	got     []string
	gate    chan struct{} // when set, each write waits for a token
	started chan struct{} // a write began
}

func (r *recorder) write(b []byte) error {
	if r.started != nil {
		r.started <- struct{}{}
	}
	if r.gate != nil {
		<-r.gate
	}
	r.mu.Lock()
	r.got = append(r.got, string(b))
	r.mu.Unlock()
	return nil
}

func (r *recorder) written() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got...)
}

// outboxFuncs is an outbox's client made of the test's funcs.
type outboxFuncs struct {
	overflowFn func()
	writeFn    func([]byte) error
	finishFn   func()
}

func (f outboxFuncs) write(b []byte) error { return f.writeFn(b) }
func (f outboxFuncs) overflow()            { f.overflowFn() }
func (f outboxFuncs) closeConn()           { f.finishFn() }

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// The writer comes and goes with the queue, and order holds across its
// lives: messages pushed while one writer drains, and after it ended.
func TestOutboxWriterOnDemandKeepsOrder(t *testing.T) {
	r := &recorder{}
	finished := make(chan struct{})
	o := newOutbox(1<<20, outboxFuncs{func() { t.Error("overflow") }, r.write, func() { close(finished) }})
	var want []string
	for round := 0; round < 50; round++ {
		for i := 0; i < round%7+1; i++ {
			m := fmt.Sprintf("<m%d.%d/>", round, i)
			want = append(want, m)
			o.push([]byte(m))
		}
		if round%3 == 0 {
			if !o.waitIdle(5 * time.Second) {
				t.Fatal("the writer did not end with an empty queue")
			}
		}
	}
	o.shutdown()
	<-finished
	got := r.written()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("written out of order or lost:\n got %v\nwant %v", got, want)
	}
	o.mu.Lock()
	running := o.running
	o.mu.Unlock()
	if running {
		t.Fatal("a writer still runs after shutdown")
	}
}

// A client that does not read is dropped once what waits for it passes
// the bound; nothing queued before is reordered.
func TestOutboxOverflowDropsTheClient(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), started: make(chan struct{}, 1)}
	overflowed := make(chan struct{})
	finished := make(chan struct{})
	o := newOutbox(10, outboxFuncs{func() { close(overflowed) }, r.write, func() { close(finished) }})
	o.push([]byte("first"))
	<-r.started // the writer holds "first" in a write the client does not take
	o.push([]byte("12345"))
	o.push([]byte("67890"))
	select {
	case <-overflowed:
		t.Fatal("overflow at exactly the bound")
	default:
	}
	o.push([]byte("x"))
	<-overflowed
	o.push([]byte("after")) // ignored: the connection is being dropped
	close(r.gate)
	<-finished
	o.shutdown()
	if got := r.written(); fmt.Sprint(got) != "[first]" {
		t.Fatalf("written %v, want only what was in flight", got)
	}
}

// detach stops the writer between messages and returns what it had not
// written; reattach writes it first.
func TestOutboxDetachAndReattach(t *testing.T) {
	r := &recorder{gate: make(chan struct{}), started: make(chan struct{}, 4)}
	finished := make(chan struct{})
	o := newOutbox(1<<20, outboxFuncs{func() { t.Error("overflow") }, r.write, func() { close(finished) }})
	o.push([]byte("a"))
	<-r.started
	o.push([]byte("b"))
	done := make(chan [][]byte)
	go func() {
		pending, ok := o.detach(5 * time.Second)
		if !ok {
			t.Error("detach gave up")
		}
		done <- pending
	}()
	waitFor(t, "detaching", o.isDetached)
	r.gate <- struct{}{} // "a" completes; the writer stops before "b"
	pending := <-done
	if len(pending) != 1 || string(pending[0]) != "b" {
		t.Fatalf("pending %q, want [b]", pending)
	}
	o.push([]byte("c")) // queued while detached: no writer starts
	r.gate = nil
	o.reattach(pending)
	o.shutdown()
	<-finished
	if got := r.written(); fmt.Sprint(got) != "[a b c]" {
		t.Fatalf("written %v, want [a b c]", got)
	}
}
