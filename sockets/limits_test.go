package sockets

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// A client that stalls while its stream opens (before the header, or
// before STARTTLS) is told so with a connection-timeout stream error at
// the handshake deadline, then closed.
func TestStalledOpeningGetsConnectionTimeout(t *testing.T) {
	lis, err := Listen("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		ServeC2S(lis, C2SConfig{TLS: throwawayTLS(t), HandshakeTimeout: 300 * time.Millisecond}, &echoBackend{}, false)
	}()
	defer func() { lis.Close(); <-served }()
	for _, send := range []string{"", header, "<?xml version='1.0'?><stream:stream"} {
		c, err := net.Dial("tcp", lis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, send)
		got, _ := io.ReadAll(c)
		c.Close()
		if !strings.Contains(string(got), "<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>") ||
			!strings.HasSuffix(string(got), "</stream:stream>") {
			t.Errorf("after %q and a stall: %q", send, got)
		}
	}
}
