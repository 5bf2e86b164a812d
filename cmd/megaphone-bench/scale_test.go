package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain lets the scale run's workers, which re-run this binary (the
// test binary here) as `scale-worker`, work under go test too.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == scaleWorkerCommand {
		os.Exit(scaleWorkerMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// TestScaleSmoke runs the scale run at a tiny size, to keep it working:
// two sidecars sharing a port, two load-generator processes, two steps;
// the report must show the ramp reaching its target with every session in
// ejabberd and none left after the logout. (The native ramp is the same
// code without sidecars; `make bench-scale` runs it.)
func TestScaleSmoke(t *testing.T) {
	bin, ebin := os.Getenv("MEGAPHONE_BIN"), os.Getenv("MEGAPHONE_SHIM_EBIN")
	if bin == "" || ebin == "" || testing.Short() {
		t.Skip("needs MEGAPHONE_BIN and MEGAPHONE_SHIM_EBIN (a benchmark smoke run, not a unit test)")
	}
	dir := t.TempDir()
	c := config{bin: bin, ebin: ebin, out: filepath.Join(dir, "scale.md")}
	s := &scaleConfig{target: 200, steps: []int{100, 200}, perSidecar: 100, perWorker: 100, chunk: 50, memFloor: 1 << 30, maxFailShare: 0.005,
		settle: time.Second, sweep: time.Second, keepAlive: time.Minute}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := runScale(ctx, c, s); err != nil {
		t.Fatal(err)
	}
	report, err := os.ReadFile(c.out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"2 sidecars with `--reuseport`", "| 100 | 100 | 100 | 0 |", "| 200 | 200 | 200 | 0 |",
		"Reached 200.", "0 sessions left"} {
		if !strings.Contains(string(report), want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
	if strings.Contains(string(report), "Failed") || strings.Contains(string(report), "Stopped") {
		t.Errorf("report:\n%s", report)
	}
}
