package main

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"

	"go.uber.org/zap"
)

// The collector's goal follows the load: --gc-percent while the sidecar
// is quiet, --gc-percent-busy while it allocates fast.
//
// Why: the collector's CPU per byte allocated goes as 1/GOGC whatever the
// live heap, while what GOGC costs in memory is a share of the live heap.
// An idle sidecar allocates almost nothing and its memory per connection
// is the figure that counts, so it runs at 50. Under traffic the same 50
// made collection about a third of a BOSH request's cost at the edge: the
// edge path's sidecar spent 210-260 µs of CPU a chat message at 50 and
// 147 at 400, and its paced p99 fell from ~5 to ~2.5-3 ms (BENCH.md,
// "The collector's goal under traffic"). When the traffic stops, the
// goal goes back down, and one forced collection gives the heap the busy
// goal let grow back to the system. What it cannot give back: sessions
// that logged in while the goal was high keep their objects spread over
// more pages (+1.4 KiB a TCP session, +3.6 a BOSH one at 5,000 in one
// run). So it is off by default (--gc-percent-busy 0): memory per idle
// session is what this sidecar is for; CPU-bound ones turn it on.
type gcGoal struct {
	idle, busy int
	// busyRate is the allocation rate (bytes a second) from which the
	// sidecar counts as busy; quietFor how many seconds in a row under it
	// make it idle again.
	busyRate uint64
	quietFor int

	busyNow bool
	quiet   int

	setPercent func(int) int // debug.SetGCPercent
	release    func()        // debug.FreeOSMemory
	log        *zap.Logger
}

// gcBusyRate: measured in make bench's runs (400 sessions), an idle
// sidecar allocated 0-0.3 MiB a second, logins 15-35, and a 1:1 chat of
// 200 pairs 5 (paced, TCP) to 160 (saturated, BOSH at the edge).
const (
	gcBusyRate = 2 << 20
	gcQuietFor = 3
)

func newGCGoal(idle, busy int, log *zap.Logger) *gcGoal {
	return &gcGoal{idle: idle, busy: busy, busyRate: gcBusyRate, quietFor: gcQuietFor,
		setPercent: debug.SetGCPercent, release: debug.FreeOSMemory, log: log}
}

// observe takes what was allocated over the last second.
func (g *gcGoal) observe(allocated uint64) {
	switch {
	case allocated >= g.busyRate:
		g.quiet = 0
		if !g.busyNow {
			g.busyNow = true
			g.setPercent(g.busy)
			g.log.Debug("garbage collector: busy", zap.Int("gogc", g.busy))
		}
	case g.busyNow:
		g.quiet++
		if g.quiet >= g.quietFor {
			g.busyNow, g.quiet = false, 0
			g.setPercent(g.idle)
			g.release()
			g.log.Debug("garbage collector: idle", zap.Int("gogc", g.idle))
		}
	}
}

// run samples the allocation rate each second until ctx ends.
func (g *gcGoal) run(ctx context.Context) {
	sample := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(sample)
	last := sample[0].Value.Uint64()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(sample)
		now := sample[0].Value.Uint64()
		g.observe(now - last)
		last = now
	}
}
