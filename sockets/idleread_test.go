package sockets

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
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
