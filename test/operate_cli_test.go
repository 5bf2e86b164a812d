package test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// adminSidecar is a stream sidecar with its admin endpoint on a free port.
type adminSidecar struct {
	*streamSidecar
	admin string
}

func startAdminSidecar(t *testing.T, ej *harness.Ejabberd, extra ...string) *adminSidecar {
	t.Helper()
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", port)
	sc := startStreamSidecar(t, ej, append([]string{"--admin-addr", admin}, extra...)...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar log:\n%s", tail(sc.logs(), 80))
		}
	})
	return &adminSidecar{streamSidecar: sc, admin: admin}
}

// get fetches a path of the admin endpoint: status and body.
func (s *adminSidecar) get(t *testing.T, path string) (int, string) {
	t.Helper()
	return adminRequest(t, http.MethodGet, "http://"+s.admin+path, "")
}

func adminRequest(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	client := http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric reads one series (name with its labels, as Prometheus' text
// format writes it) from /metrics; -1 if it is not there.
func (s *adminSidecar) metric(t *testing.T, series string) float64 {
	t.Helper()
	code, text := s.get(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, text)
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", series, err)
			}
			return f
		}
	}
	return -1
}

// waitMetric waits (bounded) for a series to read want.
func (s *adminSidecar) waitMetric(t *testing.T, series string, want float64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for s.metric(t, series) != want {
		if time.Now().After(deadline) {
			_, text := s.get(t, "/metrics")
			t.Fatalf("%s is not %v within 15s; /metrics:\n%s", series, want, megaphoneLines(text))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// megaphoneLines are the sidecar's own series in a /metrics page.
func megaphoneLines(text string) string {
	var b strings.Builder
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "megaphone_") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// signal sends sig to the sidecar process.
func (s *adminSidecar) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

var boshSID = regexp.MustCompile(`sid=['"]([^'"]+)['"]`)

// boshLongPoll opens a BOSH session (not logged in) and sends the request
// ejabberd holds for up to wait seconds; the answer arrives on the channel.
func boshLongPoll(t *testing.T, url string, wait int) <-chan string {
	t.Helper()
	client := &http.Client{Timeout: time.Duration(wait+30) * time.Second}
	post := func(body string) (string, error) {
		resp, err := client.Post(url, "text/xml; charset=utf-8", strings.NewReader(body))
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	created, err := post(fmt.Sprintf(`<body xmlns='http://jabber.org/protocol/httpbind' rid='1000' to='localhost' wait='%d' hold='1' ver='1.6' xml:lang='en' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>`, wait))
	if err != nil {
		t.Fatal(err)
	}
	m := boshSID.FindStringSubmatch(created)
	if m == nil {
		t.Fatalf("no BOSH session: %s", created)
	}
	answer := make(chan string, 1)
	go func() {
		got, err := post(`<body xmlns='http://jabber.org/protocol/httpbind' rid='1001' sid='` + m[1] + `'/>`)
		if err != nil {
			got = "error: " + err.Error()
		}
		answer <- got
		client.CloseIdleConnections()
	}()
	return answer
}

// refusedAt reports whether a new connection to a STARTTLS listener is
// refused: not taken at all, or closed before its stream header is
// answered (a connection it takes answers with stream features).
func refusedAt(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return true
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
	n, _ := c.Read(make([]byte, 1))
	return n == 0
}

// The admin endpoint shows the connections that are open, by transport,
// and what the sidecar refused and why; /healthz follows the attachment;
// /loglevel sets the level at runtime; and SIGHUP with a changed limit in
// the config file changes the limit the sidecar enforces.
func TestAdminEndpointAndReload(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	config := filepath.Join(t.TempDir(), "megaphone.yml")
	writeFile := func(text string) {
		if err := os.WriteFile(config, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeFile("max-conns-per-ip: 0\nlog-level: info\n")
	sc := startAdminSidecar(t, ej, "--config", config)

	if code, body := sc.get(t, "/healthz"); code != http.StatusOK || !strings.Contains(body, ej.Node+": attached") {
		t.Errorf("/healthz while attached: %d %q", code, body)
	}
	sc.waitMetric(t, fmt.Sprintf(`megaphone_ejabberd_attached{node=%q}`, ej.Node), 1)
	if sc.metric(t, fmt.Sprintf(`megaphone_link_messages_sent_total{node=%q}`, ej.Node)) < 1 {
		t.Errorf("no link message counted")
	}

	// Two logged-in streams over TLS, one TCP connection that says
	// nothing, and a BOSH long-poll being held.
	alice := rawLogin(t, sc.c2sTLS, "alice")
	defer alice.Close()
	bob := rawLogin(t, sc.c2sTLS, "bob")
	idle, err := net.DialTimeout("tcp", sc.c2s, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	held := boshLongPoll(t, sc.url(), 60)
	sc.waitMetric(t, `megaphone_connections_open{transport="tls"}`, 2)
	sc.waitMetric(t, `megaphone_connections_open{transport="tcp"}`, 1)
	sc.waitMetric(t, `megaphone_connections_open{transport="bosh"}`, 1)
	sc.waitMetric(t, fmt.Sprintf(`megaphone_bosh_in_flight{node=%q}`, ej.Node), 1)
	sc.waitMetric(t, fmt.Sprintf(`megaphone_streams{node=%q}`, ej.Node), 2)
	if in := sc.metric(t, "megaphone_bytes_in_total"); in < 500 {
		t.Errorf("bytes in: %v", in)
	}

	// A failed TLS handshake is counted by kind: plain XMPP on the direct
	// TLS port.
	if !refusedAt(sc.c2sTLS) {
		t.Error("the direct TLS port answered plain XMPP")
	}
	sc.waitMetric(t, `megaphone_handshake_failures_total{kind="tls"}`, 1)

	bob.Close()
	idle.Close()
	sc.waitMetric(t, `megaphone_connections_open{transport="tls"}`, 1)
	sc.waitMetric(t, `megaphone_connections_open{transport="tcp"}`, 0)

	// The log level, at runtime.
	if code, body := sc.get(t, "/loglevel"); code != http.StatusOK || !strings.Contains(body, `"info"`) {
		t.Errorf("GET /loglevel: %d %q", code, body)
	}
	if code, body := adminRequest(t, http.MethodPut, "http://"+sc.admin+"/loglevel", `{"level":"debug"}`); code != http.StatusOK || !strings.Contains(body, `"debug"`) {
		t.Errorf("PUT /loglevel: %d %q", code, body)
	}

	// SIGHUP: one connection per address from now on. alice and the BOSH
	// long-poll hold 127.0.0.1's share already, so the next is refused.
	if refusedAt(sc.c2s) {
		t.Fatal("a connection was refused before the limit")
	}
	writeFile("max-conns-per-ip: 1\nlog-level: warn\n")
	reloads := strings.Count(sc.logs(), "config reloaded")
	sc.signal(t, syscall.SIGHUP)
	waitUntil(t, 10*time.Second, "config reloaded", func() bool { return strings.Count(sc.logs(), "config reloaded") > reloads })
	if !regexp.MustCompile(`setting changed.*"max-conns-per-ip".*"from": "0", "to": "1"`).MatchString(sc.logs()) {
		t.Error("the reload did not log the limit it changed")
	}
	sc.waitMetric(t, `megaphone_limit{limit="max_conns_per_ip"}`, 1)
	if !refusedAt(sc.c2s) {
		t.Error("a connection over max-conns-per-ip was taken")
	}
	sc.waitMetric(t, `megaphone_connections_refused_total{reason="max_conns_per_ip"}`, 1)
	if code, body := sc.get(t, "/loglevel"); !strings.Contains(body, `"warn"`) {
		t.Errorf("the reload did not apply the file's new log level: %d %q", code, body)
	}

	// Back to no limit: logins work again.
	writeFile("max-conns-per-ip: 0\nlog-level: warn\n")
	sc.signal(t, syscall.SIGHUP)
	sc.waitMetric(t, `megaphone_limit{limit="max_conns_per_ip"}`, 0)
	rawLogin(t, sc.c2sTLS, "bob").Close()

	select {
	case got := <-held:
		t.Errorf("the held long-poll ended early: %s", got)
	default:
	}

	// The shim gone: /healthz says so with 503.
	eval(t, ej, `megaphone:stop()`)
	waitUntil(t, 20*time.Second, "/healthz turns 503", func() bool {
		code, _ := sc.get(t, "/healthz")
		return code == http.StatusServiceUnavailable
	})
	if _, body := sc.get(t, "/healthz"); !strings.Contains(body, ej.Node+": not attached") {
		t.Errorf("/healthz while detached: %q", body)
	}
	sc.waitMetric(t, fmt.Sprintf(`megaphone_ejabberd_attached{node=%q}`, ej.Node), 0)

	// The cookie shows nowhere: not in the log (debug lines included, above)
	// nor on the admin endpoint.
	cookie, err := os.ReadFile(ej.CookieFile)
	if err != nil {
		t.Fatal(err)
	}
	_, metrics := sc.get(t, "/metrics")
	if c := strings.TrimSpace(string(cookie)); c == "" || strings.Contains(sc.logs(), c) || strings.Contains(metrics, c) {
		t.Error("the cookie is in the log or the metrics")
	}
}

// SIGTERM drains the sidecar end to end: the held BOSH long-poll is
// answered with a system-shutdown terminate at once, new connections are
// refused, a live XMPP stream carries on until the grace period ends and
// then gets <system-shutdown/>, progress is logged, and the process exits 0.
func TestSIGTERMDrains(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	const grace = 4 * time.Second
	sc := startAdminSidecar(t, ej, "--shutdown-grace", grace.String())
	alice := rawLogin(t, sc.c2sTLS, "alice")
	defer alice.Close()
	held := boshLongPoll(t, sc.url(), 30)
	sc.waitMetric(t, fmt.Sprintf(`megaphone_bosh_in_flight{node=%q}`, ej.Node), 1)

	sent := time.Now()
	sc.signal(t, syscall.SIGTERM)
	select {
	case got := <-held:
		if !strings.Contains(got, "type='terminate'") || !strings.Contains(got, "system-shutdown") {
			t.Errorf("the held long-poll got %q", got)
		}
	case <-time.After(20 * time.Second): // its wait is 30 s: only the drain answers it sooner
		t.Fatal("the held long-poll was not answered by the drain")
	}
	if !refusedAt(sc.c2s) {
		t.Error("a new STARTTLS connection was taken while draining")
	}
	if c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", sc.c2sTLS,
		&tls.Config{InsecureSkipVerify: true}); err == nil { // the test's own self-signed cert
		c.Close()
		t.Error("a new direct TLS connection was taken while draining")
	}
	if resp, err := (&http.Client{Timeout: 10 * time.Second}).Post(sc.url(), "text/xml", strings.NewReader(
		`<body xmlns='http://jabber.org/protocol/httpbind' rid='1000' to='localhost' wait='10' hold='1' ver='1.6'/>`)); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), "sid=") {
			t.Errorf("a new BOSH session was opened while draining: %s", b)
		}
	}

	// alice's stream lives through the grace period, then gets the error.
	if got := readUntilClosed(alice, grace+15*time.Second); !strings.Contains(got, "<system-shutdown") {
		t.Errorf("the live stream got %q", got)
	}
	if since := time.Since(sent); since < grace-time.Second {
		t.Errorf("the live stream was ended %s after SIGTERM, before the %s grace period", since, grace)
	}

	select {
	case <-sc.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("the sidecar did not exit after the drain")
	}
	if code := sc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d", code)
	}
	for _, line := range []string{"shutting down: draining", "draining: connections left", "grace period over"} {
		if !strings.Contains(sc.logs(), line) {
			t.Errorf("no %q in the log", line)
		}
	}
}

// A taken admin address does not stop the sidecar, and is served once it
// is free: as when a new sidecar takes over from an old one that still
// holds it.
func TestAdminAddressFreedLater(t *testing.T) {
	waitsOnTimers(t)
	ej := startEjabberd(t, harness.Options{})
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", port)
	old := startSidecar(t, ej, "", "--admin-addr", admin)
	next := &adminSidecar{streamSidecar: &streamSidecar{sidecar: startSidecar(t, ej, "", "--admin-addr", admin)}, admin: admin}
	waitUntil(t, 10*time.Second, "the second sidecar reports the taken address", func() bool {
		return strings.Contains(next.logs(), "admin endpoint (metrics) not served yet")
	})
	if code, body := next.get(t, "/healthz"); code != http.StatusOK || !strings.Contains(body, ej.Node+": attached") {
		t.Fatalf("/healthz from the first sidecar: %d %q", code, body)
	}
	old.kill()
	waitUntil(t, 15*time.Second, "the second sidecar serves the admin endpoint", func() bool {
		return strings.Contains(next.logs(), "serving the admin endpoint")
	})
	next.waitMetric(t, fmt.Sprintf(`megaphone_ejabberd_attached{node=%q}`, ej.Node), 1)
	if !strings.Contains(next.logs(), `"metrics": "http://`+admin+`/metrics"`) {
		t.Errorf("the second sidecar serves the admin endpoint elsewhere:\n%s", next.logs())
	}
}
