package test

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// The port carrier: the operator starts the sidecar from ejabberd's shell
// as an Erlang port (no distribution link, no cookie); the BOSH
// end-to-end chat passes through it; when the sidecar dies the shim starts
// it again and clients log in again; stop_port ends it.
func TestPortCarrier(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	t.Cleanup(func() {
		if t.Failed() { // the port sidecar logs to the node's stderr
			if b, err := os.ReadFile(ej.ConsoleLog); err == nil {
				t.Logf("node console:\n%s", tail(string(b), 60))
			}
		}
	})
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	url := "http://" + addr + "/bosh"
	out := shell(t, ej, fmt.Sprintf(`megaphone:start_port(%q, ["--bosh-addr", %q, "--admin-addr", ""]).`, sidecarBin, addr))
	mustContain(t, "start_port", out, "{ok,<")
	t.Cleanup(func() { shell(t, ej, fmt.Sprintf(`megaphone:stop_port(%q).`, sidecarBin)) })

	osPid := func() int {
		m := regexp.MustCompile(`os_pid => (\d+)`).FindStringSubmatch(eval(t, ej, `megaphone:ports()`))
		if m == nil {
			return 0
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	attached := func() bool {
		return strings.Contains(eval(t, ej, `[maps:get(name, S) || S <- maps:get(sidecars, megaphone:status())]`), "megaphone_port_")
	}
	waitUntil(t, 30*time.Second, "the port sidecar attaches", attached)
	if got := eval(t, ej, `[N || N <- nodes(hidden), lists:prefix("megaphone", atom_to_list(N))]`); got != "[]" {
		t.Errorf("port mode opened a distribution link: %s", got)
	}
	if res := startClient(t, url, "--count", "200").wait(t, 2*time.Minute); !res.OK || res.Received["a"] != 200 || res.Received["b"] != 200 {
		t.Fatalf("BOSH chat through the port sidecar: %+v", res)
	}

	// A crash: the shim starts it again, and clients are served again.
	first := osPid()
	if first == 0 {
		t.Fatal("megaphone:ports() shows no OS pid")
	}
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the shim restarts the port sidecar", func() bool {
		p := osPid()
		return p != 0 && p != first && attached()
	})
	if res := startClient(t, url, "--count", "50").wait(t, 2*time.Minute); !res.OK {
		t.Fatalf("BOSH chat after the restart: %+v", res)
	}

	// stop_port ends the sidecar process.
	second := osPid()
	mustContain(t, "stop_port", shell(t, ej, fmt.Sprintf(`megaphone:stop_port(%q).`, sidecarBin)), "ok")
	waitUntil(t, 20*time.Second, "the port sidecar exits", func() bool {
		return syscall.Kill(second, 0) != nil
	})
	if got := eval(t, ej, `megaphone:ports()`); got != "[]" {
		t.Errorf("after stop_port, ports() = %s", got)
	}
}
