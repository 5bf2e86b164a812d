package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// goroutines scrapes go_goroutines from a sidecar's /metrics, on a
// connection of its own (a kept-alive one would be a goroutine more).
func goroutines(t *testing.T, admin string) int {
	t.Helper()
	m := regexp.MustCompile(`(?m)^go_goroutines (\d+)$`).FindStringSubmatch(scrapeOnce(t, admin))
	if m == nil {
		t.Fatal("no go_goroutines in /metrics")
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

func scrapeOnce(t *testing.T, admin string) string {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// rawBOSH posts BOSH bodies by hand, for tests that need to hold a
// long-poll or see the exact answer.
type rawBOSH struct {
	url    string
	client *http.Client
}

const httpbindNS = "http://jabber.org/protocol/httpbind"

func newRawBOSH(url string) *rawBOSH {
	return &rawBOSH{url: url, client: &http.Client{Timeout: 2 * time.Minute}}
}

// post returns the answer's status and body (0 and the error if none came).
func (b *rawBOSH) post(body string) (int, string) {
	resp, err := b.client.Post(b.url, "text/xml; charset=utf-8", strings.NewReader(body))
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(got)
}

// newSession opens a session (rid 100, wait 60, hold 1) and returns its sid.
func (b *rawBOSH) newSession(t *testing.T) string {
	t.Helper()
	code, body := b.post("<body xmlns='" + httpbindNS + "' rid='100' to='localhost' wait='60' hold='1' ver='1.6' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
	sid := regexp.MustCompile(`sid='([0-9a-f]+)'`).FindStringSubmatch(body)
	if code != 200 || sid == nil {
		t.Fatalf("session creation: %d %q", code, body)
	}
	return sid[1]
}

// recoveredFromLinkFault checks what must hold once a link fault is over:
// the sidecar re-attaches within limit, new BOSH and TLS logins work,
// ejabberd keeps no session, c2s or request process beyond its baseline,
// and the sidecar's sockets are back to theirs.
func recoveredFromLinkFault(t *testing.T, ej *harness.Ejabberd, sc *streamSidecar, bosh *rawBOSH, limit time.Duration, baseLeftover, baseFDs int) {
	t.Helper()
	select {
	case <-sc.exited:
		t.Fatalf("the sidecar exited:\n%s", tail(sc.logs(), 40))
	default:
	}
	waitUntil(t, limit, "the sidecar re-attaches", func() bool {
		return strings.Count(sc.logs(), "attached to the shim") >= 2
	})
	bosh.newSession(t)
	rawLogin(t, sc.c2sTLS, "bob").Close()
	waitUntil(t, 40*time.Second, "ejabberd keeps no session, c2s or request process", func() bool {
		return evalInt(t, ej, "length(maps:get(sidecars, megaphone:status()))") == 1 &&
			evalInt(t, ej, leftoverExpr) == baseLeftover
	})
	bosh.client.CloseIdleConnections() // the sidecar holds their other ends
	waitUntil(t, 20*time.Second, "the sidecar's sockets back to baseline", func() bool { return sc.openFiles(t) <= baseFDs })
}

// rssKiB reads a process's resident set size from /proc.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			return n
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// settle waits until the sidecar's goroutines are back within margin of
// base, and fails with the count otherwise.
func settleGoroutines(t *testing.T, admin string, base, margin int) {
	t.Helper()
	var n int
	for i := 0; i < 60; i++ {
		if n = goroutines(t, admin); n <= base+margin {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("%d goroutines 30 s after the fault, baseline %d (margin %d)", n, base, margin)
}

// The distribution link closed under the sidecar mid-traffic, from
// ejabberd's side (erlang:disconnect_node/1 closes its socket) or from the
// sidecar's (ss -K destroys its socket, as a broken network would): the
// held BOSH poll is answered with a remote-connection-failed terminate,
// the XMPP stream (busy sending) gets the same stream error and is closed,
// the sidecar re-attaches, new logins work, and its goroutines, sockets
// and ejabberd's processes return to their baselines.
func TestDistributionLinkDroppedMidTraffic(t *testing.T) {
	waitsOnTimers(t)
	testLinkDropped(t, func(t *testing.T, ej *harness.Ejabberd, sc *streamSidecar) {
		eval(t, ej, `erlang:disconnect_node('`+sc.name+`')`)
	})
}

func TestDistributionSocketDestroyedMidTraffic(t *testing.T) {
	waitsOnTimers(t)
	if _, err := exec.LookPath("ss"); err != nil {
		t.Skip("no ss (iproute2) to destroy the socket with")
	}
	testLinkDropped(t, func(t *testing.T, ej *harness.Ejabberd, sc *streamSidecar) {
		name, _, _ := strings.Cut(ej.Node, "@")
		port := eval(t, ej, `{ok, Names} = net_adm:names(), proplists:get_value("`+name+`", Names)`)
		// Sockets to ejabberd's distribution port: the sidecar's link
		// (the harness's probes have hung up by now).
		out, err := exec.Command("ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", ":"+port).CombinedOutput()
		if err != nil || !strings.Contains(string(out), ":"+port) {
			t.Fatalf("ss -K destroyed nothing: %v\n%s", err, out)
		}
	})
}

func testLinkDropped(t *testing.T, drop func(*testing.T, *harness.Ejabberd, *streamSidecar)) {
	ej := startEjabberd(t, harness.Options{BOSHInactivity: 5 * time.Second})
	base := evalInt(t, ej, leftoverExpr)
	admin := freeAddr(t)
	sc := startStreamSidecar(t, ej, "--admin-addr", admin)
	fds := sc.openFiles(t)
	baseGoroutines := goroutines(t, admin)

	bosh := newRawBOSH(sc.url())
	sid := bosh.newSession(t)
	polled := make(chan string, 1)
	go func() {
		_, body := bosh.post(fmt.Sprintf("<body xmlns='%s' sid='%s' rid='101'/>", httpbindNS, sid))
		polled <- body
	}()

	// The stream is busy: alice sends herself a message every 20 ms and
	// reads what comes back, until the stream ends.
	stream := rawLogin(t, sc.c2sTLS, "alice")
	defer stream.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 3000; i++ { // a minute at most
			msg := fmt.Sprintf("<message to='alice@localhost' type='chat'><body>%d</body></message>", i)
			if _, err := io.WriteString(stream, msg); err != nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	streamEnded := make(chan string, 1)
	go func() {
		_ = stream.SetReadDeadline(time.Now().Add(time.Minute))
		b, _ := io.ReadAll(stream)
		streamEnded <- string(b)
	}()
	time.Sleep(time.Second) // traffic flows

	drop(t, ej, sc)
	select {
	case body := <-polled:
		if !strings.Contains(body, "remote-connection-failed") {
			t.Errorf("the held poll got %q, want a remote-connection-failed terminate", body)
		}
	case <-time.After(30 * time.Second):
		t.Error("the held poll got no answer 30 s after the link was dropped")
	}
	select {
	case got := <-streamEnded:
		if !strings.Contains(got, "remote-connection-failed") {
			t.Errorf("the stream ended without a remote-connection-failed stream error: %q", tail(got, 3))
		}
	case <-time.After(30 * time.Second):
		t.Error("the XMPP stream is still open 30 s after the link was dropped")
	}
	wg.Wait()

	recoveredFromLinkFault(t, ej, sc, bosh, 30*time.Second, base, fds)
	settleGoroutines(t, admin, baseGoroutines, 2)
	if strings.Contains(sc.logs(), "panic") {
		t.Errorf("the sidecar panicked:\n%s", tail(sc.logs(), 40))
	}
}

// ejabberd floods 20 stream clients that read nothing at once, 10 MB each
// (200 MB for a sidecar that can hand its clients almost none of it):
// the sidecar's memory stays bounded (its outboxes are), the slow clients
// are cut, no c2s stays blocked on the full distribution buffer (the
// shim's send_busy_timeout ends it), a chatting pair through the same
// sidecar carries on, and afterwards nothing is left on either side.
func TestFloodIntoSlowClientsStaysBounded(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	base := evalInt(t, ej, leftoverExpr)
	const slow = 20
	eval(t, ej, fmt.Sprintf(`[ok = ejabberd_auth:try_register(<<"slow", (integer_to_binary(I))/binary>>, <<"localhost">>, <<"%s">>)
	    || I <- lists:seq(1, %d)], ok`, demoPassword, slow))
	admin := freeAddr(t)
	sc := startStreamSidecar(t, ej, "--admin-addr", admin)
	pid := sc.cmd.Process.Pid
	fds := sc.openFiles(t)
	baseGoroutines := goroutines(t, admin)
	baseRSS := rssKiB(t, pid)

	bystanders := xmppChat(t, "xmpps://"+sc.c2sTLS, "--mode", "live", "--duration", "20", "--timeout", "90")
	bystanders.waitReady(t)
	var conns []net.Conn
	for i := 1; i <= slow; i++ {
		c := rawLogin(t, sc.c2sTLS, fmt.Sprintf("slow%d", i))
		defer c.Close()
		conns = append(conns, c)
	}

	// 200 messages of 50 KB to each, routed by one process on the node.
	eval(t, ej, fmt.Sprintf(`Body = binary:copy(<<"x">>, 50000),
	    Ms = [xmpp:decode({xmlel, <<"message">>, [{<<"to">>, <<"slow", (integer_to_binary(I))/binary, "@localhost">>},
	          {<<"from">>, <<"bob@localhost/flood">>}, {<<"type">>, <<"chat">>}],
	          [{xmlel, <<"body">>, [], [{xmlcdata, Body}]}]}, <<"jabber:client">>, []) || I <- lists:seq(1, %d)],
	    [ejabberd_router:route(M) || _ <- lists:seq(1, 200), M <- Ms], ok`, slow))

	peak := 0
	deadline := time.Now().Add(40 * time.Second)
	for time.Now().Before(deadline) {
		peak = max(peak, rssKiB(t, pid))
		if !strings.Contains(eval(t, ej, "ejabberd_sm:dirty_get_sessions_list()"), "slow") {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if s := eval(t, ej, "ejabberd_sm:dirty_get_sessions_list()"); strings.Contains(s, "slow") {
		t.Errorf("slow readers still have sessions 40 s into the flood: %s", s)
	}
	t.Logf("sidecar RSS: %d MiB before, %d MiB at the peak of a 200 MB flood", baseRSS>>10, peak>>10)
	// Each slow client may hold its outbox (1 MiB), its TLS and socket
	// buffers; a sidecar that buffered the flood would hold 200 MB.
	if grew := (peak - baseRSS) >> 10; grew > 100 {
		t.Errorf("the sidecar grew by %d MiB during the flood (bounded outboxes: at most ~%d MiB expected)", grew, 3*slow)
	}
	if n := strings.Count(sc.logs(), "client reads too slowly"); n == 0 {
		t.Error("no slow reader was cut by the sidecar's bounded outbox")
	}
	if res := bystanders.wait(t, 2*time.Minute); !res.OK {
		t.Errorf("bystanders hurt: %+v", res)
	}
	waitUntil(t, 30*time.Second, "ejabberd keeps no c2s of the slow readers", func() bool {
		return evalInt(t, ej, leftoverExpr) == base
	})
	for _, c := range conns {
		c.Close()
	}
	waitUntil(t, 20*time.Second, "the sidecar's sockets back to baseline", func() bool { return sc.openFiles(t) <= fds })
	settleGoroutines(t, admin, baseGoroutines, 2)
}
