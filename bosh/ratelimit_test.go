package bosh

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/sockets"
)

// The allowance is a token bucket: perSec requests at once, then perSec a
// second; the first request over it cuts the session for good; sessions
// the router does not know are not counted (nor stored).
func TestRouterAdmit(t *testing.T) {
	r := newRouter(nil)
	r.owners["s"] = owner{}
	t0 := time.Unix(1000, 0)
	for i := 0; i < 3; i++ {
		if ok, _ := r.admit("s", 3, t0); !ok {
			t.Fatalf("request %d of a burst of 3 refused", i+1)
		}
	}
	if ok, _ := r.admit("s", 3, t0.Add(400*time.Millisecond)); !ok {
		t.Fatal("a request after a third of a second's refill refused")
	}
	ok, cutNow := r.admit("s", 3, t0.Add(450*time.Millisecond))
	if ok || !cutNow {
		t.Fatalf("the request over the rate: ok %v, cut %v", ok, cutNow)
	}
	if ok, cutNow := r.admit("s", 3, t0.Add(time.Hour)); ok || cutNow {
		t.Errorf("a cut session came back: ok %v, cut %v", ok, cutNow)
	}
	for i := 0; i < 100; i++ {
		if ok, _ := r.admit(fmt.Sprint("made-up-", i), 1, t0); !ok {
			t.Fatal("a session the router does not know was limited")
		}
	}
	if len(r.owners) != 1 {
		t.Errorf("made-up sids grew the table to %d", len(r.owners))
	}
}

// Through the handler: a session that posts faster than the limit gets a
// policy-violation terminate, and so does every later request of it;
// ejabberd gets a terminate with the refused request's rid; another
// session at a sane pace is untouched.
func TestHandlerCutsOveractiveSession(t *testing.T) {
	backend := &recordingBackend{name: "n"}
	url, h := serveWithLimits(t, sockets.Limits{MaxBodyBytes: 1024, MaxBOSHRequestsPerSec: 5}, backend)
	sidRE := regexp.MustCompile(`sid='([^']+)'`)
	open := func() string {
		_, body := post(t, url, okBody)
		return sidRE.FindStringSubmatch(body)[1]
	}
	hostile, calm := open(), open()
	rid := 100
	cutAt := 0
	for ; rid < 140 && cutAt == 0; rid++ {
		_, body := post(t, url, fmt.Sprintf("<body xmlns='%s' sid='%s' rid='%d'/>", NS, hostile, rid))
		if strings.Contains(body, "policy-violation") {
			cutAt = rid
		}
	}
	if cutAt == 0 {
		t.Fatal("40 requests as fast as possible were never cut at 5 a second")
	}
	if _, body := post(t, url, fmt.Sprintf("<body xmlns='%s' sid='%s' rid='%d'/>", NS, hostile, rid)); !strings.Contains(body, "policy-violation") {
		t.Errorf("a cut session's next request got %q", body)
	}
	if _, body := post(t, url, fmt.Sprintf("<body xmlns='%s' sid='%s' rid='1'/>", NS, calm)); strings.Contains(body, "terminate") {
		t.Errorf("the calm session got %q", body)
	}
	backend.mu.Lock()
	var terminates []string
	for _, r := range backend.reqs {
		if info, _ := checkBody(r.Body); info.Terminate {
			terminates = append(terminates, fmt.Sprintf("%s/%s", info.SID, info.RID))
		}
	}
	backend.mu.Unlock()
	if want := fmt.Sprintf("%s/%d", hostile, cutAt); len(terminates) != 1 || terminates[0] != want {
		t.Errorf("terminates sent to ejabberd: %v, want [%s]", terminates, want)
	}
	if st := h.Stats(); st.Overactive != 2 {
		t.Errorf("overactive count %d, want 2", st.Overactive)
	}
}
