package main

import (
	"runtime/debug"
	"testing"

	"go.uber.org/goleak"
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
