package main

import (
	"runtime/debug"
	"slices"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"
)

// TestMain fails the package's tests if any goroutine outlives them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// --gc-percent sets the collector's goal; a GOGC in the environment, which
// the runtime applied at start, is left alone.
func TestGCPercent(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	noEnv := func(string) (string, bool) { return "", false }
	if v, from := applyGCPercent(50, noEnv); v != "50" || from != "gc-percent" {
		t.Fatalf("got %s from %s", v, from)
	}
	if was := debug.SetGCPercent(100); was != 50 {
		t.Fatalf("collector's goal %d, want 50", was)
	}
	withEnv := func(k string) (string, bool) { return "80", k == "GOGC" }
	if v, from := applyGCPercent(50, withEnv); v != "80" || from != "GOGC" {
		t.Fatalf("got %s from %s", v, from)
	}
	if was := debug.SetGCPercent(100); was != 100 {
		t.Fatalf("collector's goal %d changed under GOGC", was)
	}
}

// The goal goes to busy at the first second over the rate, stays there
// through fewer than quietFor quiet seconds, and goes back to idle, with
// the heap released, after quietFor of them.
func TestGCGoalFollowsTheLoad(t *testing.T) {
	var set []int
	released := 0
	g := &gcGoal{idle: 50, busy: 400, busyRate: 1000, quietFor: 3,
		setPercent: func(p int) int { set = append(set, p); return 0 },
		release:    func() { released++ }, log: zap.NewNop()}
	for _, allocated := range []uint64{0, 10, 5000, 5000, 0, 0, 9000, 0, 0, 0, 0, 0} {
		g.observe(allocated)
	}
	if want := []int{400, 50}; !slices.Equal(set, want) || released != 1 {
		t.Fatalf("goals set %v (want %v), heap released %d times (want 1)", set, want, released)
	}
	if g.busyNow {
		t.Fatal("still busy after the quiet seconds")
	}
}
