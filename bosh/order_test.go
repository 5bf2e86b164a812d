package bosh

import (
	"context"
	"testing"
	"time"
)

// Requests of a session that arrive out of rid order go out in rid order;
// one whose predecessor never comes goes out after gapWait, and the
// session is not waited for again.
func TestRIDOrder(t *testing.T) {
	o := newRIDOrder()
	o.opened("s", "100")
	ctx := context.Background()

	out := make(chan string, 4)
	enter := func(rid string) {
		sent, err := o.enter(ctx, "s", rid)
		if err != nil {
			t.Error(err)
			return
		}
		out <- rid
		sent()
	}
	go enter("103")
	go enter("102")
	time.Sleep(50 * time.Millisecond)
	select {
	case rid := <-out:
		t.Fatalf("rid %s went out before rid 101", rid)
	default:
	}
	go enter("101")
	for _, want := range []string{"101", "102", "103"} {
		select {
		case got := <-out:
			if got != want {
				t.Fatalf("got rid %s, want %s", got, want)
			}
		case <-time.After(gapWait / 2):
			t.Fatalf("rid %s did not go out", want)
		}
	}

	// A retransmission goes at once.
	if _, err := o.enter(ctx, "s", "102"); err != nil {
		t.Fatal(err)
	}
	// A gap that does not fill: out after gapWait, then no more waiting.
	start := time.Now()
	sent, err := o.enter(ctx, "s", "106")
	if err != nil || time.Since(start) < gapWait {
		t.Fatalf("rid 106 out after %v (%v), want gapWait", time.Since(start), err)
	}
	sent()
	start = time.Now()
	if _, err := o.enter(ctx, "s", "110"); err != nil || time.Since(start) >= gapWait {
		t.Fatalf("rid 110 of an unordered session waited %v (%v)", time.Since(start), err)
	}

	// A client that hangs up while its request waits.
	o.opened("t", "1")
	cctx, cancel := context.WithCancel(ctx)
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	if _, err := o.enter(cctx, "t", "5"); err == nil {
		t.Fatal("a cancelled request went out")
	}
	// Sessions the front did not open, and rids that are not numbers,
	// are not held.
	for _, c := range [][2]string{{"unknown", "7"}, {"t", "x"}, {"", "3"}} {
		start := time.Now()
		if _, err := o.enter(ctx, c[0], c[1]); err != nil || time.Since(start) >= gapWait {
			t.Fatalf("%v waited %v (%v)", c, time.Since(start), err)
		}
	}
	// An ended session is forgotten.
	o.forget("t")
	if _, ok := o.sessions["t"]; ok {
		t.Fatal("session t still known")
	}
}
