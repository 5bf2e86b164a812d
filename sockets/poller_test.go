package sockets

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// parkedStreams counts r's connections whose socket waits in the poller
// with no reader goroutine.
func parkedStreams(r *Registry) int {
	n := 0
	for _, c := range r.snapshot() {
		if p := c.poll.Load(); p != nil {
			p.mu.Lock()
			if p.state == readerParked {
				n++
			}
			p.mu.Unlock()
		}
	}
	return n
}

// waitParked waits (bounded) until n of r's streams are parked.
func waitParked(t *testing.T, r *Registry, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if parkedStreams(r) == n {
			return
		}
	}
	t.Fatalf("%d streams parked, want %d", parkedStreams(r), n)
}

// inPoller reports whether c's socket is registered with the poller.
func inPoller(c *Conn) bool {
	p := c.poll.Load()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.token != 0
}

// serveEcho serves XMPP streams on a fresh listener with an echoing
// backend (movingBackend, which counts c2s closes).
func serveEcho(t *testing.T, cfg C2SConfig, directTLS bool) (*Registry, *Listener, *movingBackend) {
	t.Helper()
	reg := NewRegistry(Limits{})
	lis, err := ListenStreams("127.0.0.1:0", reg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	backend := &movingBackend{}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	go ServeC2S(lis, cfg, backend, directTLS)
	return reg, lis, backend
}

// openStream connects, sends the stream header and waits for ejabberd's
// (the echo's) answer.
func openStream(t *testing.T, addr string, tlsCfg *tls.Config) net.Conn {
	t.Helper()
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.SetDeadline(time.Now().Add(30 * time.Second))
	conn := raw
	if tlsCfg != nil {
		conn = tls.Client(raw, tlsCfg)
	}
	io.WriteString(conn, header)
	var got bytes.Buffer
	readUntil(t, conn, &got, "<stream:stream")
	return conn
}

// Idle streams, plain and TLS, wait in the poller with no goroutine each;
// input after a long idle wakes each of them and comes back in order, and
// a client that hangs up while its stream is parked ends the stream.
func TestIdleStreamsParkWithoutGoroutines(t *testing.T) {
	for _, directTLS := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%v", directTLS), func(t *testing.T) {
			var cfg C2SConfig
			var clientTLS *tls.Config
			if directTLS {
				cfg.TLS = throwawayTLS(t)
				clientTLS = &tls.Config{InsecureSkipVerify: true} // the test's own self-signed cert
			}
			reg, lis, backend := serveEcho(t, cfg, directTLS)
			before := runtime.NumGoroutine()
			const n = 200
			conns := make([]net.Conn, n)
			for i := range conns {
				conns[i] = openStream(t, lis.Addr().String(), clientTLS)
				defer conns[i].Close()
			}
			waitParked(t, reg, n)
			// A reader per stream would be n goroutines more; a few may
			// still be on their way out (writers, handshakes).
			if extra := runtime.NumGoroutine() - before; extra > n/4 {
				t.Errorf("%d goroutines more with %d idle streams parked", extra, n)
			}

			time.Sleep(300 * time.Millisecond) // idle
			for i, c := range conns {
				fmt.Fprintf(c, "<message to='b@x' id='%d'><body>after the idle</body></message>", i)
				fmt.Fprintf(c, "<message to='b@x' id='%d-2'/>", i)
			}
			for i, c := range conns {
				var got bytes.Buffer
				readUntil(t, c, &got, fmt.Sprintf("id='%d-2'", i))
				want := fmt.Sprintf("<message to='b@x' id='%d'><body>after the idle</body></message><message to='b@x' id='%d-2'", i, i)
				if !strings.Contains(got.String(), want) {
					t.Fatalf("stream %d echoed %q", i, got.String())
				}
			}
			waitParked(t, reg, n) // each parks again once drained

			for _, c := range conns {
				c.Close() // the peer hangs up while its stream is parked
			}
			waitOpen(t, reg, 0)
			backend.mu.Lock()
			defer backend.mu.Unlock()
			for id, st := range backend.streams {
				if st.closed.Load() != 1 {
					t.Errorf("stream %d: c2s closed %d times, want 1", id, st.closed.Load())
				}
			}
		})
	}
}

// An operator's kick reaches a parked stream: the client gets the stream
// error, c2s is told, and the socket leaves the poller before it closes.
func TestParkedStreamIsKicked(t *testing.T) {
	reg, lis, backend := serveEcho(t, C2SConfig{}, false)
	conn := openStream(t, lis.Addr().String(), nil)
	defer conn.Close()
	waitParked(t, reg, 1)
	c := reg.snapshot()[0]
	if err := reg.Kick(c.ID); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(conn)
	if !strings.Contains(string(rest), "<policy-violation") || !strings.HasSuffix(string(rest), "</stream:stream>") {
		t.Errorf("kicked client got %q", rest)
	}
	waitOpen(t, reg, 0)
	// The close that leaves the registry is the writer's; c2s is told by
	// the reader the kick woke, which may come a moment later.
	st := backend.stream(c.ID)
	waitFor(t, "c2s told of the close", func() bool { return st.closed.Load() != 0 })
	if st.closed.Load() != 1 {
		t.Errorf("c2s closed %d times, want 1", st.closed.Load())
	}
	if inPoller(c) {
		t.Error("the kicked stream's socket is still in the poller")
	}
	if c.poll.Load().park() {
		t.Error("a closed socket parked again")
	}
}

// A takeover gets a parked stream out of the poller: its reader is woken
// to stop at the boundary, the socket moves with the bytes the framer
// held (none here: it parks only between units), and the new process
// reads on, parking the socket in its own turn.
func TestParkedStreamMoves(t *testing.T) {
	from, lis, backend := serveEcho(t, C2SConfig{}, false)
	to := NewRegistry(Limits{})
	client := openStream(t, lis.Addr().String(), nil)
	defer client.Close()
	io.WriteString(client, "<message to='b@x'><body>1</body></message>")
	var got bytes.Buffer
	readUntil(t, client, &got, "<body>1</body>")
	waitParked(t, from, 1)
	old := from.snapshot()[0]

	st := moveOne(t, from, to, backend, func(st StreamState, conn net.Conn) error {
		return AdoptC2S(to, C2SConfig{}, backend, st, conn)
	})
	if len(st.Unread) != 0 {
		t.Errorf("unread %q, want none", st.Unread)
	}
	waitOpen(t, from, 0)
	waitParked(t, to, 1)
	if inPoller(old) {
		t.Error("the moved socket is still in the old process's poller")
	}
	io.WriteString(client, "<message to='b@x'><body>2</body></message></stream:stream>")
	rest, _ := io.ReadAll(client)
	got.Write(rest)
	if !strings.Contains(got.String(), "<body>1</body></message><message to='b@x'><body>2</body>") ||
		!strings.HasSuffix(got.String(), "</stream:stream>") {
		t.Errorf("client got %s", got.String())
	}
	waitOpen(t, to, 0)
}

// shapingBackend is an echo c2s that shapes its stream at once.
type shapingBackend struct {
	movingBackend
	rate int64
}

func (b *shapingBackend) OpenStream(ctx context.Context, open etf.C2SOpen, sink StreamSink) (Stream, error) {
	sink.Shape(b.rate)
	return b.movingBackend.OpenStream(ctx, open, sink)
}

// A shaped stream's reader pauses while it runs (it is not parked in the
// middle of a pause, so the kernel holds what the client sends meanwhile)
// and parks once it is idle again; nothing is lost or reordered.
func TestShapedStreamPausesThenParks(t *testing.T) {
	reg := NewRegistry(Limits{})
	lis, err := ListenStreams("127.0.0.1:0", reg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	const rate = 2000 // bytes a second, with a second of burst
	go ServeC2S(lis, C2SConfig{HandshakeTimeout: 5 * time.Second}, &shapingBackend{rate: rate}, false)
	client := openStream(t, lis.Addr().String(), nil)
	defer client.Close()
	waitParked(t, reg, 1)

	var sent strings.Builder
	for i := 0; sent.Len() < 3*rate; i++ {
		fmt.Fprintf(&sent, "<message to='b@x' id='%d'><body>%s</body></message>", i, strings.Repeat("z", 100))
	}
	start := time.Now()
	io.WriteString(client, sent.String())
	sawRunning := false
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for !strings.Contains(got.String(), sent.String()) {
		sawRunning = sawRunning || parkedStreams(reg) == 0
		_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := client.Read(buf)
		if err != nil {
			t.Fatalf("echo: %v after %d bytes", err, got.Len())
		}
		got.Write(buf[:n])
	}
	// A second of burst, then the rest at the rate: about 2 s for 3 s of
	// it (a functional bound: the pause happened, not how fast it was).
	if took := time.Since(start); took < time.Second {
		t.Errorf("%d bytes at %d B/s came back in %s: the shaper did not pause the reader", sent.Len(), rate, took)
	}
	if !sawRunning {
		t.Error("the stream stayed parked while it was read")
	}
	waitParked(t, reg, 1)
	io.WriteString(client, "</stream:stream>")
	io.ReadAll(client)
	waitOpen(t, reg, 0)
}
