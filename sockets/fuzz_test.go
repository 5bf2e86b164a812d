package sockets

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// FuzzC2SNegotiation sends any bytes to an XMPP client listener: with a
// certificate (plain=false) the sidecar answers the pre-TLS stream and
// STARTTLS itself; without one (plain=true) the stream goes to a stand-in
// c2s. Whatever the bytes: no panic; the connection ends once the client
// stops (nothing hangs); what the sidecar writes before TLS is well-formed
// XML, the client's `to` included; and with STARTTLS required nothing
// reaches ejabberd, since no fuzzed input completes a TLS handshake.
func FuzzC2SNegotiation(f *testing.F) {
	starttls := "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
	for _, seed := range []string{
		header,
		"<?xml version='1.0'?>" + header + starttls,
		header + starttls + "\x16\x03\x01\x00\x05hello",
		header + "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGRlbW8=</auth>",
		strings.Replace(header, "to='localhost'", `to='a&apos;&lt;b&quot;&gt;&amp;'`, 1) + starttls,
		header + "<starttls xmlns='wrong'/>",
		header + "<message><body>hi</body></message>" + header + "</stream:stream>",
		"GET / HTTP/1.1\r\n\r\n",
		"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
	} {
		f.Add([]byte(seed), false)
		f.Add([]byte(seed), true)
	}
	certs := throwawayTLS(f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { lis.Close() })
	f.Fuzz(func(t *testing.T, in []byte, plain bool) {
		client, err := net.Dial("tcp", lis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		server, err := lis.Accept()
		if err != nil {
			t.Fatal(err)
		}
		conn, _ := NewRegistry(Limits{MaxStanzaBytes: 4096}).admit(server, true)
		cfg := C2SConfig{HandshakeTimeout: 3 * time.Second, Logger: zap.NewNop()}
		if !plain {
			cfg.TLS = certs
		}
		backend := &echoBackend{}
		served := make(chan struct{})
		go func() {
			defer close(served)
			serveC2SConn(conn, &cfg, backend, false)
		}()

		_ = client.SetDeadline(time.Now().Add(5 * time.Second))
		// The sidecar may end the connection before it has read it all.
		if _, err := client.Write(in); err == nil {
			_ = client.(*net.TCPConn).CloseWrite()
		}
		out, _ := io.ReadAll(client)
		select {
		case <-served:
		case <-time.After(5 * time.Second):
			t.Fatalf("connection still served 5 s after the client stopped; input %q", in)
		}

		if !plain && len(backend.opened) > 0 {
			t.Fatalf("a stream reached ejabberd without TLS: %+v", backend.opened)
		}
		if !plain {
			// After <proceed/> comes TLS (or its alert), not XML.
			if i := strings.Index(string(out), "<proceed"); i >= 0 {
				out = out[:i]
			}
		}
		p := xmlstream.NewParser(strings.NewReader(string(out)), xmlstream.Limits{MaxStanzaBytes: 1 << 20})
		for range len(out) + 1 {
			if _, err := p.Next(); err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("the sidecar wrote bad XML (%v): %q", err, out)
				}
				return
			}
		}
	})
}

// throwawayTLS is a TLS configuration with a self-signed
// certificate.
func throwawayTLS(tb testing.TB) *tls.Config {
	cert, key, err := harness.SelfSignedCert(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	certs, err := LoadCertificates(cert, key)
	if err != nil {
		tb.Fatal(err)
	}
	return certs.TLSConfig()
}
