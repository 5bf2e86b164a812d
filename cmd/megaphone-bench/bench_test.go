package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
)

// TestSmoke runs the whole benchmark at a tiny size, to keep it working:
// every transport on both paths (BOSH relayed and at the edge), chat on
// each, the report and (with gnuplot) the plots. It needs the sidecar and
// the shim (MEGAPHONE_BIN, MEGAPHONE_SHIM_EBIN, as make integration sets
// them) and takes about three minutes.
func TestSmoke(t *testing.T) {
	bin, ebin := os.Getenv("MEGAPHONE_BIN"), os.Getenv("MEGAPHONE_SHIM_EBIN")
	if bin == "" || ebin == "" || testing.Short() {
		t.Skip("needs MEGAPHONE_BIN and MEGAPHONE_SHIM_EBIN (a benchmark smoke run, not a unit test)")
	}
	dir := t.TempDir()
	// A one-second idle: the smoke run checks the harness works, not the
	// figures, which need two sweeps (minIdle) to mean anything.
	c := config{bin: bin, ebin: ebin, ns: []int{20}, workers: 10, pairs: 5, chatFor: time.Second, pacedRate: 5,
		idle: time.Second, sweep: defaultSweep, dialer: loadgen.NewDialer(4), out: filepath.Join(dir, "bench.md"),
		kinds: transports}
	if _, err := exec.LookPath("gnuplot"); err == nil {
		c.plots = dir
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if err := run(ctx, c); err != nil {
		t.Fatal(err)
	}
	report, err := os.ReadFile(c.out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| TCP c2s | Megaphone | 20 |", "| BOSH | native | 20 |", "| BOSH (edge) | Megaphone | 20 |", "| BOSH (edge) | native | 20 |", "| WebSocket | native |", "Failed"} {
		if got := strings.Contains(string(report), want); got != (want != "Failed") {
			t.Errorf("report: %q present %v\n%s", want, got, report)
		}
	}
	// Every transport chatted on both paths; BOSH, whose chat client is
	// the newest, lost nothing.
	_, chat, _ := strings.Cut(string(report), "## 1:1 chat")
	for _, k := range transports {
		for _, path := range []string{"Megaphone", "native"} {
			row := "| " + kindNames[k] + " | " + path + " |"
			i := strings.Index(chat, row)
			if i < 0 {
				t.Errorf("no chat row %q\n%s", row, report)
				continue
			}
			line, _, _ := strings.Cut(chat[i:], "\n")
			if k.client() == loadgen.BOSH && !strings.HasSuffix(line, "| 0 |") {
				t.Errorf("chat %s %s lost messages: %s", kindNames[k], path, line)
			}
		}
	}
	if c.plots != "" {
		if _, err := os.Stat(filepath.Join(dir, "memory.png")); err != nil {
			t.Error(err)
		}
	}
}

// The nodes started ahead follow the order run measures the sides in:
// Megaphone then native per transport and N, the chat's users on the
// first N, and no node for the native side bosh-edge shares with bosh.
func TestPlannedUsersFollowTheRun(t *testing.T) {
	c := config{kinds: []transport{transportTCP, transportBOSH, transportBOSHEdge}, ns: []int{300, 5000}, pairs: 200}
	want := []int{400, 400, 5000, 5000, 400, 400, 5000, 5000, 400, 5000}
	if got := plannedUsers(c); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("planned users %v, want %v", got, want)
	}
	c.pairs = 0 // no chat: one user per session
	want = []int{300, 300, 5000, 5000, 300, 300, 5000, 5000, 300, 5000}
	if got := plannedUsers(c); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("without chat: planned users %v, want %v", got, want)
	}
}
