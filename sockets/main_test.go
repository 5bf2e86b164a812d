package sockets

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// connection, reader and writer the code starts must end with it. The
// poller's own goroutine lives as long as the process; a stream parked in
// it has no goroutine, so the poller must hold no socket either.
func TestMain(m *testing.M) {
	code := m.Run()
	// A stream the last test's client left is ended by a reader the
	// poller starts once it sees the hang-up: wait for that (bounded)
	// before counting goroutines and sockets.
	for deadline := time.Now().Add(5 * time.Second); sharedPoller != nil && sharedPoller.registered() > 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreAnyFunction("github.com/megaphone-im/megaphone/sockets.(*poller).run")); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	if code == 0 && sharedPoller != nil {
		if n := sharedPoller.registered(); n > 0 {
			fmt.Fprintf(os.Stderr, "%d sockets still in the poller after the tests\n", n)
			code = 1
		}
	}
	os.Exit(code)
}
