package sockets

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// A stream's reader waits for readability holding no buffer, then reads
// what is there without blocking. Over TLS that must not strand what
// crypto/tls already holds: a 16 KiB record carries many stanzas, more
// than one read takes, and nothing more comes until the echo is back.
// Stanzas split across writes (and TLS records) with idle gaps between
// the pieces must arrive whole and in order too.
func TestIdleReaderTakesEverythingInOrder(t *testing.T) {
	for _, directTLS := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%v", directTLS), func(t *testing.T) {
			lis, err := Listen("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			defer lis.Close()
			cfg := C2SConfig{HandshakeTimeout: 5 * time.Second}
			if directTLS {
				cfg.TLS = throwawayTLS(t)
			}
			go ServeC2S(lis, cfg, &echoBackend{}, directTLS)

			raw, err := net.Dial("tcp", lis.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			_ = raw.SetDeadline(time.Now().Add(20 * time.Second))
			var conn net.Conn = raw
			if directTLS {
				conn = tls.Client(raw, &tls.Config{InsecureSkipVerify: true}) // the test's own self-signed cert
			}
			var want strings.Builder
			var burst strings.Builder
			for i := 0; i < 150; i++ { // ~15 KiB in one write: one TLS record, several reads
				fmt.Fprintf(&burst, "<message to='b@x' id='%d'><body>%s</body></message>", i, strings.Repeat("y", 60))
			}
			want.WriteString(burst.String())
			split := "<message to='b@x' id='split'><body>in pieces</body></message>"
			want.WriteString(split)
			io.WriteString(conn, header+burst.String())
			for i := 0; i < len(split); i += 9 {
				time.Sleep(20 * time.Millisecond) // the reader parks between the pieces
				io.WriteString(conn, split[i:min(i+9, len(split))])
			}
			io.WriteString(conn, "</stream:stream>")
			got, _ := io.ReadAll(conn)
			s := string(got)
			if i := strings.Index(s, "<message"); i < 0 || !strings.HasPrefix(s[i:], want.String()) ||
				!strings.HasSuffix(s, "</stream:stream>") {
				t.Fatalf("echo (%d bytes) is not the %d bytes sent, in order", len(got), want.Len())
			}
		})
	}
}

// capturingConn holds what a TLS client writes once capture is on, so
// that the test can cut the records where it likes.
type capturingConn struct {
	net.Conn
	mu      sync.Mutex
	capture bool
	held    []byte
}

func (c *capturingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.capture {
		c.held = append(c.held, b...)
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// crypto/tls returns the data of a record together with "would block"
// when the next record is a TLS 1.2 alert it has only part of; the stanza
// in that data must reach c2s all the same.
func TestTLSDataBeforeAPartialAlertIsKept(t *testing.T) {
	lis, err := Listen("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go ServeC2S(lis, C2SConfig{HandshakeTimeout: 5 * time.Second, TLS: throwawayTLS(t)}, &echoBackend{}, true)

	raw, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	cc := &capturingConn{Conn: raw}
	// TLS 1.2: its alerts travel as alert records (1.3 hides them as data).
	tc := tls.Client(cc, &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12}) // the test's own self-signed cert
	io.WriteString(tc, header)
	var got bytes.Buffer
	readUntil(t, tc, &got, "<stream:stream")

	cc.mu.Lock()
	cc.capture = true
	cc.mu.Unlock()
	io.WriteString(tc, "<message to='b@x' id='last'/>")
	if err := tc.CloseWrite(); err != nil { // the close_notify alert
		t.Fatal(err)
	}
	held := cc.held
	if len(held) < 5 || held[0] != 23 {
		t.Fatalf("captured %d bytes, not an application data record first", len(held))
	}
	first := 5 + (int(held[3])<<8 | int(held[4]))
	if len(held) <= first+3 || held[first] != 21 {
		t.Fatalf("captured %d bytes, no alert record after the %d-byte data record", len(held), first)
	}
	_ = raw.SetWriteDeadline(time.Now().Add(10 * time.Second)) // CloseWrite set one in the past
	raw.Write(held[:first+3])                                  // the data record and three bytes of the alert's header
	time.Sleep(100 * time.Millisecond)
	raw.Write(held[first+3:])
	rest, _ := io.ReadAll(tc)
	got.Write(rest)
	if !strings.Contains(got.String(), "id='last'") {
		t.Errorf("the stanza before the alert was lost: got %q", got.String())
	}
}
