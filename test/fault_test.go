package test

import (
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// ejabberd frozen (SIGSTOP) for longer than the link's tick silence (13 s
// with --tick-interval 2s: four ticks and a margin), then thawed: the sidecar declares the
// link dead, answers the BOSH long-poll it was holding with a
// remote-connection-failed terminate, closes the XMPP stream whose c2s it
// can no longer reach, survives, re-attaches once ejabberd runs again,
// and new logins work; neither side keeps anything of the old streams.
func TestEjabberdPausedPastTickTime(t *testing.T) {
	waitsOnTimers(t)
	if testing.Short() {
		t.Skip("pauses ejabberd for a quarter of a minute")
	}
	// BOSH sessions end soon after their last request, so that the end
	// can check nothing is left.
	ej := startEjabberd(t, harness.Options{BOSHInactivity: 5 * time.Second})
	base := evalInt(t, ej, leftoverExpr)
	// A 2 s tick: the link is declared dead after 13 s of silence, not 65.
	sc := startStreamSidecar(t, ej, "--tick-interval", "2s")
	fds := sc.openFiles(t)

	bosh := newRawBOSH(sc.url())
	sid := bosh.newSession(t)
	stream := rawLogin(t, sc.c2sTLS, "alice")
	defer stream.Close()

	if err := syscall.Kill(ej.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			_ = syscall.Kill(ej.Pid, syscall.SIGCONT)
		}
	}
	defer thaw()

	// A long-poll ejabberd can no longer answer, and a stream it can no
	// longer serve: both must end once the link is declared dead.
	type answer struct {
		code int
		body string
		took time.Duration
	}
	polled := make(chan answer, 1)
	go func() {
		start := time.Now()
		resp, err := bosh.client.Post(sc.url(), "text/xml; charset=utf-8",
			strings.NewReader(fmt.Sprintf("<body xmlns='%s' sid='%s' rid='101'/>", httpbindNS, sid)))
		if err != nil {
			polled <- answer{body: err.Error(), took: time.Since(start)}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		polled <- answer{resp.StatusCode, string(b), time.Since(start)}
	}()
	type ending struct {
		took time.Duration
		tail string
	}
	streamEnded := make(chan ending, 1)
	go func() {
		start := time.Now()
		_ = stream.SetReadDeadline(time.Now().Add(100 * time.Second))
		b, _ := io.ReadAll(stream)
		streamEnded <- ending{time.Since(start), string(b)}
	}()

	var a answer
	select {
	case a = <-polled:
	case <-time.After(100 * time.Second):
		t.Fatal("the BOSH long-poll got no answer 100 s into the pause")
	}
	t.Logf("held poll answered after %s: %d %q", a.took.Round(time.Second), a.code, a.body)
	if a.code != 200 || !strings.Contains(a.body, "remote-connection-failed") {
		t.Errorf("held poll: %d %q, want a remote-connection-failed terminate", a.code, a.body)
	}
	select {
	case e := <-streamEnded:
		t.Logf("XMPP stream closed after %s", e.took.Round(time.Second))
		if !strings.Contains(e.tail, "remote-connection-failed") {
			t.Errorf("the stream ended without a remote-connection-failed stream error: %q", e.tail)
		}
	case <-time.After(20 * time.Second):
		t.Error("the XMPP stream is still open after the link was declared dead")
	}
	thaw()
	recoveredFromLinkFault(t, ej, sc, bosh, 60*time.Second, base, fds)
}
