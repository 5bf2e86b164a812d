package bosh

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
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

// ejabberdLink stands for the one link to ejabberd that both processes of
// a hot upgrade write to: it records the rids in the order they go out.
type ejabberdLink struct {
	mu   sync.Mutex
	rids []string
}

func (l *ejabberdLink) sentRIDs() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.rids, " ")
}

// linkEnd is one process's way onto the link; while paused (a takeover in
// progress), its requests wait before going out.
type linkEnd struct {
	link    *ejabberdLink
	paused  chan struct{} // closed when the writes may go on; nil: never paused
	waiting atomic.Int32
}

func (e *linkEnd) Peer() string   { return "ejabberd@localhost" }
func (e *linkEnd) Attached() bool { return true }

func (e *linkEnd) ProcessBOSH(ctx context.Context, req etf.BOSHRequest) (etf.BOSHResponse, error) {
	if e.paused != nil {
		e.waiting.Add(1)
		select {
		case <-e.paused:
		case <-ctx.Done():
			return etf.BOSHResponse{}, ctx.Err()
		}
	}
	info, _ := checkBody(req.Body)
	e.link.mu.Lock()
	e.link.rids = append(e.link.rids, info.RID)
	e.link.mu.Unlock()
	etf.Sent(ctx)
	body := "<body xmlns='" + NS + "'/>"
	if info.SID == "" {
		body = "<body xmlns='" + NS + "' sid='s'/>"
	}
	return etf.BOSHResponse{ConnID: req.ConnID, ReqID: req.ReqID, Status: 200, Body: []byte(body)}, nil
}

// boshRequest sends one request of session sid ("" opens one) through h.
func boshRequest(t *testing.T, h *Handler, sid, rid string) {
	t.Helper()
	body := fmt.Sprintf("<body xmlns='%s' sid='%s' rid='%s'/>", NS, sid, rid)
	if sid == "" {
		body = fmt.Sprintf("<body xmlns='%s' rid='%s' to='localhost' wait='60' hold='1'/>", NS, rid)
	}
	info, err := checkBody([]byte(body))
	if err != nil {
		t.Error(err)
		return
	}
	req := etf.BOSHRequest{ReqID: h.reqIDs.Add(1), Body: []byte(body)}
	if _, _, err := h.router.route(context.Background(), req, info); err != nil {
		t.Error(err)
	}
}

// A hot upgrade: the old process has read rid 102 but not sent it when
// its link pauses, and reads rid 103 just after; both go out later,
// through the new process. The client meanwhile sends rid 104 to the new
// process, which must hold it until 102 and 103 are out (the old process
// reports them), however long that takes, and not send it first.
func TestRIDOrderAcrossTakeover(t *testing.T) {
	link := &ejabberdLink{}
	oldEnd := &linkEnd{link: link}
	old := NewHandler(Config{}, oldEnd)
	boshRequest(t, old, "", "100")
	boshRequest(t, old, "s", "101")

	// The pause: 102 has been read, its write waits.
	oldEnd.paused = make(chan struct{})
	go boshRequest(t, old, "s", "102")
	waitFor(t, "rid 102 to reach the paused link", func() bool { return oldEnd.waiting.Load() == 1 })
	handed := old.HandOverOrder()

	// The new process carries the order on; the old one reports to it.
	next := NewHandler(Config{}, &linkEnd{link: link})
	next.AdoptOrder(handed)
	old.ReportTo(next.Elsewhere)
	// The old process reads 103 after the handover; the client sends 104
	// to the new one.
	go boshRequest(t, old, "s", "103")
	waitFor(t, "rid 103 to reach the old front", func() bool {
		old.router.order.mu.Lock()
		defer old.router.order.mu.Unlock()
		return len(old.router.order.sessions["s"].inFlight) == 2
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		boshRequest(t, next, "s", "104")
	}()
	// Longer than any gap is waited for: the old process still has them.
	time.Sleep(gapWait + 200*time.Millisecond)
	if got := link.sentRIDs(); got != "100 101" {
		t.Fatalf("while the old process holds rids 102 and 103, the link has %q", got)
	}

	// The old process's writes go on (through the new one's link).
	released := time.Now()
	close(oldEnd.paused)
	select {
	case <-done:
	case <-time.After(5 * gapWait):
		t.Fatal("rid 104 never went out")
	}
	if got := link.sentRIDs(); got != "100 101 102 103 104" {
		t.Fatalf("ejabberd got rids %q, want 100 101 102 103 104", got)
	}
	if waited := time.Since(released); waited >= gapWait/2 {
		t.Errorf("rid 104 waited %v after rid 103 went out: it was not told", waited)
	}
}

// Within one process too, a request waits for a lower rid that is on its
// way (a write to the link can take seconds under load) longer than for
// one the front has not seen.
func TestRIDOrderWaitsForRequestInFlight(t *testing.T) {
	o := newRIDOrder()
	o.opened("s", "1")
	ctx := context.Background()
	sent2, err := o.enter(ctx, "s", "2") // goes, and is slow to be written
	if err != nil {
		t.Fatal(err)
	}
	var written []string
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		sent, err := o.enter(ctx, "s", "3")
		if err != nil {
			t.Error(err)
			return
		}
		mu.Lock()
		written = append(written, "3")
		mu.Unlock()
		sent()
	}()
	time.Sleep(gapWait + 200*time.Millisecond)
	mu.Lock()
	written = append(written, "2")
	mu.Unlock()
	sent2()
	<-done
	if got := strings.Join(written, " "); got != "2 3" {
		t.Fatalf("written in the order %q, want 2 3", got)
	}
}

// Reports of the old process: events between the snapshot and the relay
// are queued, then passed on in order; a takeover undone reports nothing.
func TestRIDOrderReports(t *testing.T) {
	o := newRIDOrder()
	o.opened("s", "1")
	o.opened("t", "1")
	o.handOver()
	ctx := context.Background()
	sent2, _ := o.enter(ctx, "s", "2")
	var reports []string
	o.reportTo(func(e RIDEvent) { reports = append(reports, fmt.Sprintf("%c%s%d", e.Kind, e.SID, e.RID)) })
	sent2()
	sent2() // once only
	cctx, cancel := context.WithCancel(ctx)
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	if _, err := o.enter(cctx, "t", "5"); err == nil {
		t.Fatal("a cancelled request went out")
	}
	if got := strings.Join(reports, " "); got != "Es2 Ss2 Et5 Dt5" {
		t.Fatalf("reported %q, want Es2 Ss2 Et5 Dt5", got)
	}

	o = newRIDOrder()
	o.opened("s", "1")
	o.handOver()
	sent2, _ = o.enter(ctx, "s", "2")
	o.keep()
	sent2()
	if len(o.queued) != 0 || o.report != nil {
		t.Fatalf("a takeover undone still queues %v", o.queued)
	}
}

// The new process stops waiting for the old one's requests when it ends.
func TestRIDOrderElsewhereEnded(t *testing.T) {
	o := newRIDOrder()
	o.adopt([]SessionOrder{{SID: "s", Next: 5, InFlight: []uint64{5}}})
	go func() { time.Sleep(50 * time.Millisecond); o.elsewhereEnded() }()
	start := time.Now()
	if _, err := o.enter(context.Background(), "s", "6"); err != nil {
		t.Fatal(err)
	}
	// Then rid 5 is a gap like any other.
	if waited := time.Since(start); waited < gapWait || waited > inFlightWait/2 {
		t.Fatalf("rid 6 waited %v, want about gapWait after the old process ended", waited)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i > 400 {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
