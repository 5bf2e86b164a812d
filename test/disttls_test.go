package test

import (
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// ejabberd with its distribution over TLS (-proto_dist inet_tls, both ends
// presenting certificates of one CA): a sidecar given the CA and a
// certificate attaches and carries BOSH chat over the TLS link; a sidecar
// speaking plain TCP, and one with the CA but no certificate of its own,
// never attach.
func TestDistributionOverTLS(t *testing.T) { forEachTarget(t, testDistributionOverTLS) }

func testDistributionOverTLS(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{DistTLS: true})
	f := ej.DistTLS
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("ejabberd's log:\n%s", tail(readFile(t, ej.ConsoleLog), 40))
		}
	})
	plain := spawnSidecar(t, ej, "")
	noCert := spawnSidecar(t, ej, "", "--dist-tls-ca", f.CA)
	sc := startSidecar(t, ej, "", "--dist-tls-ca", f.CA, "--dist-tls-cert", f.Cert, "--dist-tls-key", f.Key)

	// The link is ssl_dist's: its controller is a process, where a plain
	// TCP link's is a port.
	ctrl := eval(t, ej, `proplists:get_value('`+sc.name+`', erlang:system_info(dist_ctrl))`)
	if !strings.HasPrefix(ctrl, "<") {
		t.Errorf("the sidecar's distribution controller is %s, not ssl_dist's process", ctrl)
	}
	res := startClient(t, sc.url(), "--mode", "chat", "--count", "20", "--timeout", "60").wait(t, 90*time.Second)
	if res.Received["a"] != 20 || res.Received["b"] != 20 {
		t.Errorf("received %v over the TLS link, want 20 each", res.Received)
	}

	hidden := eval(t, ej, "nodes(hidden)")
	for _, s := range []struct {
		what string
		sc   *sidecar
		err  string
	}{{"plain TCP", plain, "handshake with"}, {"no client certificate", noCert, ""}} {
		select {
		case <-s.sc.attached:
			t.Errorf("a sidecar with %s attached to a TLS distribution:\n%s", s.what, s.sc.logs())
		default:
		}
		if strings.Contains(hidden, s.sc.name) {
			t.Errorf("a sidecar with %s is connected: nodes(hidden) = %s", s.what, hidden)
		}
		if !strings.Contains(s.sc.logs(), "cannot attach to the shim") || !strings.Contains(s.sc.logs(), s.err) {
			t.Errorf("a sidecar with %s does not say why it cannot attach:\n%s", s.what, tail(s.sc.logs(), 10))
		}
	}
}
