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
// its link pauses; it goes out later, through the new process. The client
// meanwhile sends rid 103 to the new process, which must hold it until 102
// is out (the old process reports it), not send it first.
func TestRIDOrderAcrossTakeover(t *testing.T) {
	link := &ejabberdLink{}
	oldEnd := &linkEnd{link: link}
	old := NewHandler(Config{}, oldEnd)
	boshRequest(t, old, "", "100")
	boshRequest(t, old, "s", "101")

	// The pause: 102 has been read, its write waits.
	oldEnd.paused = make(chan struct{})
	go boshRequest(t, old, "s", "102")
	for i := 0; oldEnd.waiting.Load() == 0; i++ {
		if i > 200 {
			t.Fatal("rid 102 did not reach the paused link")
		}
		time.Sleep(5 * time.Millisecond)
	}
	handed := old.HandOverOrder()

	// The new process carries the order on, and takes the client's 103.
	next := NewHandler(Config{}, &linkEnd{link: link})
	next.AdoptOrder(handed)
	done := make(chan struct{})
	go func() {
		defer close(done)
		boshRequest(t, next, "s", "103")
	}()
	time.Sleep(100 * time.Millisecond)
	if got := link.sentRIDs(); got != "100 101" {
		t.Fatalf("while the old process holds rid 102, the link has %q", got)
	}

	// Go: the old process's writes relay through the new one, and it
	// reports each rid after its frame.
	old.ReportSentTo(next.SentElsewhere)
	released := time.Now()
	close(oldEnd.paused)
	select {
	case <-done:
	case <-time.After(5 * gapWait):
		t.Fatal("rid 103 never went out")
	}
	if got := link.sentRIDs(); got != "100 101 102 103" {
		t.Fatalf("ejabberd got rids %q, want 100 101 102 103", got)
	}
	if waited := time.Since(released); waited >= gapWait/2 {
		t.Errorf("rid 103 waited %v after rid 102 went out: it was not told", waited)
	}
}

// A rid sent after the snapshot but before the relay is up is reported
// once it is; a takeover undone reports nothing.
func TestRIDOrderReportsQueued(t *testing.T) {
	o := newRIDOrder()
	o.opened("s", "1")
	o.opened("t", "1")
	o.handOver()
	o.sent("s", 2)
	var reports []string
	o.reportTo(func(sid string, rid uint64) { reports = append(reports, fmt.Sprint(sid, rid)) })
	o.sent("t", 2)
	o.sent("t", 2) // already out: nothing new to say
	if got := strings.Join(reports, " "); got != "s2 t2" {
		t.Fatalf("reported %q, want s2 t2", got)
	}

	o = newRIDOrder()
	o.opened("s", "1")
	o.handOver()
	o.sent("s", 2)
	o.keep()
	o.sent("s", 3)
	if len(o.queued) != 0 || o.report != nil {
		t.Fatalf("a takeover undone still queues %v", o.queued)
	}
}
