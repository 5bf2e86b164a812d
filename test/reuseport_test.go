package test

import (
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// Two sidecars with --reuseport serve the same ports in front of one
// ejabberd, each its own hidden node: the shim shows both attached and
// the kernel spreads clients over them. When one stops, its clients get a
// stream error, the other's chat on, and new clients all reach the
// survivor. This is how one host serves more client sockets than one
// process may open (BENCH.md, the scale run).
func TestTwoSidecarsShareThePorts(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	eval(t, ej, fmt.Sprintf(`[ejabberd_auth:try_register(<<"u", (integer_to_binary(I))/binary>>, <<"localhost">>, <<%q>>)
	    || I <- lists:seq(1, 24)], ok`, demoPassword))
	cert, key, err := harness.SelfSignedCert(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c2sTLS, httpAddr := freeAddr(t), freeAddr(t)
	args := []string{"--c2s-tls-addr", c2sTLS, "--tls-cert", cert, "--tls-key", key, "--reuseport", "--shutdown-grace", "1s"}
	a := startSidecar(t, ej, httpAddr, args...)
	b := startSidecar(t, ej, httpAddr, args...)
	if n := evalInt(t, ej, "length(maps:get(sidecars, megaphone:status()))"); n != 2 {
		t.Fatalf("megaphone:status() shows %d sidecars, want 2", n)
	}

	clients := map[string]net.Conn{}
	for i := 1; i <= 16; i++ { // each from a new source port: the kernel's hash sends them both ways
		u := fmt.Sprintf("u%d", i)
		clients[u] = rawLogin(t, c2sTLS, u)
		defer clients[u].Close()
	}
	where := sidecarOfUsers(t, ej)
	var onA, onB []string
	for u, sc := range where {
		switch sc {
		case a.name:
			onA = append(onA, u)
		case b.name:
			onB = append(onB, u)
		}
	}
	t.Logf("on %s: %v; on %s: %v", a.name, onA, b.name, onB)
	if len(onA) == 0 || len(onB) == 0 || len(onA)+len(onB) != 16 {
		t.Fatalf("16 clients not spread over both sidecars: %v", where)
	}

	// The first sidecar stops (SIGTERM: a drain, then <system-shutdown/>).
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	for _, u := range onA {
		c := clients[u]
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, _ := io.ReadAll(c)
		if !strings.Contains(string(got), "system-shutdown") {
			t.Errorf("%s on the stopped sidecar read %q, want a system-shutdown stream error", u, got)
		}
	}
	select {
	case <-a.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("the stopped sidecar did not exit")
	}

	// New clients all reach the survivor, and chat with its old ones.
	for i := 17; i <= 24; i++ {
		u := fmt.Sprintf("u%d", i)
		clients[u] = rawLogin(t, c2sTLS, u)
		defer clients[u].Close()
	}
	where = sidecarOfUsers(t, ej)
	if len(where) != len(onB)+8 {
		t.Errorf("after the stop: %d connections listed, want %d: %v", len(where), len(onB)+8, where)
	}
	for u, sc := range where {
		if sc != b.name {
			t.Errorf("%s is on %s, not on the surviving %s", u, sc, b.name)
		}
	}
	old, fresh := onB[0], "u17"
	chat(t, clients[old], clients[fresh], fresh, "from-the-survivor's-old-client")
	chat(t, clients[fresh], clients[old], old, "and-back")
	waitUntil(t, 20*time.Second, "ejabberd holds only the survivor's sessions", func() bool {
		return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == len(onB)+8
	})
}

// sidecarOfUsers maps each logged-in user to the sidecar holding its
// connection, as megaphone:connections() tells it.
func sidecarOfUsers(t *testing.T, ej *harness.Ejabberd) map[string]string {
	t.Helper()
	out := eval(t, ej, `[{J, S} || #{jid := J, sidecar := S} <- megaphone:connections(), is_binary(J)]`)
	re := regexp.MustCompile(`\{<<"(u\d+)@localhost[^"]*">>,\s*<<"([^"]+)">>\}`)
	where := map[string]string{}
	for _, m := range re.FindAllStringSubmatch(out, -1) {
		where[m[1]] = m[2]
	}
	return where
}

// chat sends body from one raw client to user and waits until the other
// client, that user, has it.
func chat(t *testing.T, from, to net.Conn, user, body string) {
	t.Helper()
	if _, err := io.WriteString(from, fmt.Sprintf("<message to='%s@localhost' type='chat'><body>%s</body></message>", user, body)); err != nil {
		t.Fatal(err)
	}
	_ = to.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer to.SetReadDeadline(time.Time{})
	var seen strings.Builder
	buf := make([]byte, 4096)
	for !strings.Contains(seen.String(), body) {
		n, err := to.Read(buf)
		seen.Write(buf[:n])
		if err != nil {
			t.Fatalf("%s waiting for %q: %v (got %q)", user, body, err, seen.String())
		}
	}
}
