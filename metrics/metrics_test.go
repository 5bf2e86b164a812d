package metrics

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/bosh"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/goleak"
	"go.uber.org/zap"
)

// TestMain fails the package's tests if any goroutine outlives them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func get(t *testing.T, h http.Handler, method, path, body string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
	return rec.Code, rec.Body.String()
}

// The collector reads the registry at scrape time: connections a real
// listener took show by transport, refusals by reason, and every reason
// is there at 0 before its first event.
func TestMetricsReadTheRegistry(t *testing.T) {
	reg := sockets.NewRegistry(sockets.Limits{MaxConnsPerIP: 2})
	lis, err := sockets.Listen("127.0.0.1:0", reg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	accepted := make(chan net.Conn, 3)
	acceptDone := make(chan struct{})
	go func() { // ends when the listener closes
		defer close(acceptDone)
		for {
			c, err := lis.Accept() // one over the limit is refused inside
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	defer func() { lis.Close(); <-acceptDone }()
	for range 3 {
		c, err := net.Dial("tcp", lis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	var taken []net.Conn
	for range 2 {
		c := <-accepted
		defer c.Close()
		taken = append(taken, c)
	}
	// The third: refused once Accept has seen it.
	for i := 0; i < 100 && reg.Stats().Refused[sockets.RefusedMaxConnsPerIP] == 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	taken[0].(*sockets.Conn).SetTransport("tls")
	if _, err := taken[0].Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}

	h := AdminHandler(Sources{Registry: reg, BOSH: bosh.NewHandler(bosh.Config{}), Version: "v-test"}, nil)
	_, text := get(t, h, http.MethodGet, "/metrics", "")
	for _, want := range []string{
		`megaphone_connections_open{transport="tls"} 1`,
		`megaphone_connections_open{transport="opening"} 1`,
		`megaphone_connections_open{transport="websocket"} 0`,
		`megaphone_connections_accepted_total 2`,
		`megaphone_connections_refused_total{reason="max_conns_per_ip"} 1`,
		`megaphone_connections_refused_total{reason="draining"} 0`,
		`megaphone_bytes_out_total 5`,
		`megaphone_handshake_failures_total{kind="starttls"} 0`,
		`megaphone_limit{limit="max_conns_per_ip"} 2`,
		`megaphone_bosh_requests_outcome_total{outcome="forwarded"} 0`,
		`megaphone_build_info{goversion="`,
		`version="v-test"} 1`,
		`go_goroutines `,
		`process_open_fds `,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in /metrics", want)
		}
	}
}

// Without an attached node the sidecar is not healthy; /loglevel is only
// served when given a level, and then sets it.
func TestHealthAndLogLevel(t *testing.T) {
	reg := sockets.NewRegistry(sockets.Limits{})
	if code, _ := get(t, AdminHandler(Sources{Registry: reg}, nil), http.MethodGet, "/healthz", ""); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz with no node attached: %d", code)
	}
	if code, _ := get(t, AdminHandler(Sources{Registry: reg}, nil), http.MethodGet, "/loglevel", ""); code != http.StatusNotFound {
		t.Errorf("/loglevel without a level: %d", code)
	}
	level := zap.NewAtomicLevel()
	h := AdminHandler(Sources{Registry: reg}, &level)
	if code, body := get(t, h, http.MethodPut, "/loglevel", `{"level":"debug"}`); code != http.StatusOK || level.Level() != zap.DebugLevel {
		t.Errorf("PUT /loglevel: %d %s, level %v", code, body, level.Level())
	}
	if code, body := get(t, h, http.MethodPut, "/loglevel", `{"level":"loud"}`); code != http.StatusBadRequest || level.Level() != zap.DebugLevel {
		t.Errorf("PUT a bad level: %d %s, level %v", code, body, level.Level())
	}
	_, body := get(t, h, http.MethodGet, "/", "")
	if !strings.Contains(body, "/metrics") {
		t.Errorf("index: %q", body)
	}
}
