package node

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Handshake frames carry a 2-byte length over TCP and a 4-byte one over
// TLS (inet_tls_dist's {packet, 4}); a length past any handshake message
// is refused before anything is allocated for it.
func TestHandshakeFraming(t *testing.T) {
	for _, f := range []handshakeFraming{2, 4} {
		var buf bytes.Buffer
		if err := f.write(&buf, []byte("Nhello")); err != nil {
			t.Fatal(err)
		}
		if buf.Len() != int(f)+6 {
			t.Errorf("framing %d: %d bytes on the wire", f, buf.Len())
		}
		got, err := f.read(bufio.NewReader(&buf))
		if err != nil || string(got) != "Nhello" {
			t.Errorf("framing %d: read %q, %v", f, got, err)
		}
	}
	huge := bufio.NewReader(bytes.NewReader([]byte{0x7f, 0xff, 0xff, 0xff}))
	if _, err := handshakeFraming(4).read(huge); err == nil {
		t.Error("a 2 GiB handshake frame was not refused")
	}
}

func TestDistTLSConfigNeedsItsCA(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ cert, key, ca, want string }{
		{"c.pem", "k.pem", "", "--dist-tls-ca"},
		{"", "", filepath.Join(dir, "missing.pem"), "no such file"},
		{"", "", notPEM, "no PEM certificate"},
	} {
		if _, err := DistTLSConfig(c.cert, c.key, c.ca); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("DistTLSConfig(%q, %q, %q) = %v, want an error saying %q", c.cert, c.key, c.ca, err, c.want)
		}
	}
}
