package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// boshSessionsExpr counts ejabberd's BOSH session processes: the
// ejabberd_bosh fsms, or with BOSH at the edge (MEGAPHONE_TEST_BOSH_MODE=edge)
// the sessions' c2s processes, the only ones they have in ejabberd.
func boshSessionsExpr() string {
	mod := "M == ejabberd_bosh"
	if os.Getenv("MEGAPHONE_TEST_BOSH_MODE") == "edge" {
		mod = "M == ejabberd_c2s orelse M == xmpp_stream_in"
	}
	return `length([P || P <- erlang:processes(),
    case proc_lib:translate_initial_call(P) of {M, _, _} -> ` + mod + `; _ -> false end])`
}

// A BOSH client that polls far faster than the session rate set live from
// ejabberd's shell (megaphone:limits/1) gets a policy-violation terminate
// from the sidecar, and its session ends in ejabberd at once; a Strophe
// client chatting through the same sidecar meanwhile is unaffected.
func TestBOSHOveractiveSessionIsCut(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	admin := freeAddr(t)
	sc := startSidecar(t, ej, "", "--admin-addr", admin)
	if out := eval(t, ej, `megaphone:limits(#{max_bosh_requests_per_sec => 5})`); !strings.Contains(out, "max_bosh_requests_per_sec => 5") {
		t.Fatalf("megaphone:limits/1: %s", out)
	}
	calm := startClient(t, sc.url(), "--mode", "live", "--duration", "10", "--interval-ms", "300", "--timeout", "60")
	calm.waitReady(t)
	before := evalInt(t, ej, boshSessionsExpr())

	// The hostile client sends its requests in order, rids in sequence,
	// 50 a second, without waiting for answers.
	client := &http.Client{Timeout: 20 * time.Second}
	postBody := func(body string) string {
		resp, err := client.Post(sc.url(), "text/xml; charset=utf-8", strings.NewReader(body))
		if err != nil {
			return "error: " + err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	created := postBody(`<body rid='1000' to='localhost' xml:lang='en' wait='10' hold='1' ver='1.6'
	    xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh' xmlns='http://jabber.org/protocol/httpbind'/>`)
	m := regexp.MustCompile(`sid=['"]([^'"]+)['"]`).FindStringSubmatch(created)
	if m == nil {
		t.Fatalf("no session: %s", created)
	}
	sid := m[1]
	if n := evalInt(t, ej, boshSessionsExpr()); n != before+1 {
		t.Fatalf("%d BOSH sessions in ejabberd after the hostile one opened, want %d", n, before+1)
	}
	const hostileRequests = 40
	answers := make(chan string, hostileRequests)
	for rid := 1001; rid < 1001+hostileRequests; rid++ {
		go func() {
			answers <- postBody(fmt.Sprintf(`<body rid='%d' sid='%s' xmlns='http://jabber.org/protocol/httpbind'/>`, rid, sid))
		}()
		time.Sleep(20 * time.Millisecond)
	}
	cut := 0
	for range hostileRequests {
		if strings.Contains(<-answers, "policy-violation") { // each bounded by the client's timeout
			cut++
		}
	}
	if cut == 0 {
		t.Fatalf("%d requests at 50 a second, with a limit of 5, were never cut", hostileRequests)
	}
	if a := postBody(fmt.Sprintf(`<body rid='2000' sid='%s' xmlns='http://jabber.org/protocol/httpbind'/>`, sid)); !strings.Contains(a, "policy-violation") {
		t.Errorf("the cut session's next request got %q", a)
	}
	waitUntil(t, 10*time.Second, "the hostile session ended in ejabberd", func() bool {
		return evalInt(t, ej, boshSessionsExpr()) == before
	})
	if m := scrapeOnce(t, admin); !strings.Contains(m, fmt.Sprintf(`megaphone_bosh_requests_outcome_total{outcome="overactive"} %d`, cut+1)) ||
		!strings.Contains(m, `megaphone_limit{limit="max_bosh_requests_per_sec"} 5`) {
		t.Errorf("metrics do not show the cut session and the limit:\n%s", grepLines(m, "overactive", "max_bosh"))
	}

	res := calm.wait(t, time.Minute)
	if !res.OK || res.Received["b"] == 0 || res.Received["b"] != res.Sent["a"] {
		t.Errorf("the calm Strophe client was hurt: %+v", res)
	}
}

func grepLines(s string, words ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}
