package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
)

// minIdle lets two sweeps of the shim see every c2s idle.
func minIdle(sweep time.Duration) time.Duration { return 3*sweep + time.Second }

// idleResult is one path's idle-session cost at one N, per session.
type idleResult struct {
	kind      transport
	megaphone bool
	n         int
	loginRate float64 // logins/s
	retried   int     // logins that failed once and were tried again
	// KiB per session: growth over the idle baseline divided by n.
	beamRSS, erlang, erlangGC, sidecarRSS, kernel float64
	beamPeak                                      float64 // beam's highest RSS while the sessions logged in and idled
	processes, ports                              float64 // per session
	allocators                                    string  // -alloc: the allocator breakdown, Markdown
}

// total is what one idle session costs the machine's server side: beam,
// sidecar and the kernel's half of the loopback connection.
func (r idleResult) total() float64 { return r.beamRSS + r.sidecarRSS + r.kernel }

// whileIdle runs once the sessions have logged in, as they start to idle.
func idlePhase(ctx context.Context, c config, nd *node, sc *sidecar, kind transport, t loadgen.Target, n int, whileIdle func()) (idleResult, error) {
	pid := 0
	if sc != nil {
		pid = sc.pid()
	}
	base, err := measure(ctx, nd.ej, pid)
	if err != nil {
		return idleResult{}, err
	}
	var baseAlloc allocSample
	if c.alloc {
		if baseAlloc, err = sampleAllocators(ctx, nd.ej); err != nil {
			return idleResult{}, err
		}
	}
	peak := watchPeakRSS(nd.ej.Pid)
	sessions, took, retried, err := loginAll(ctx, c, t, "b", 1, n)
	if err != nil {
		peak()
		return idleResult{}, err
	}
	whileIdle()
	time.Sleep(c.idle)
	beamPeak := peak()
	loaded, err := measure(ctx, nd.ej, pid)
	var allocators string
	if err == nil && c.alloc {
		label := fmt.Sprintf("%s, %s, N=%d", kindNames[kind], pathName(sc != nil), n)
		allocators, err = allocBreakdown(ctx, nd.ej, label, n, baseAlloc, base.beamRSS, loaded.beamRSS)
	}
	if err == nil {
		err = checkSessions(ctx, nd, n)
	}
	closeAll(sessions)
	if err != nil {
		return idleResult{}, err
	}
	per := func(a, b int64) float64 { return float64(b-a) / float64(n) / 1024 }
	r := idleResult{
		n:          n,
		loginRate:  float64(n) / took.Seconds(),
		retried:    retried,
		beamRSS:    per(base.beamRSS, loaded.beamRSS),
		beamPeak:   per(base.beamRSS, beamPeak),
		erlang:     per(base.erlangGC, loaded.erlangTotal),
		erlangGC:   per(base.erlangGC, loaded.erlangGC),
		sidecarRSS: per(base.sidecarRSS, loaded.sidecarRSS),
		// Both ends of every client connection are on this box; the
		// server's end is half.
		kernel:     per(base.kernel, loaded.kernel) / 2,
		processes:  float64(loaded.processes-base.processes) / float64(n),
		ports:      float64(loaded.ports-base.ports) / float64(n),
		allocators: allocators,
	}
	return r, nil
}

// watchPeakRSS samples a process's RSS every 100 ms until the returned
// function is called, which returns the highest.
func watchPeakRSS(pid int) func() int64 {
	stop, done := make(chan struct{}), make(chan int64)
	go func() {
		highest := rss(pid)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				done <- highest
				return
			case <-tick.C:
				highest = max(highest, rss(pid))
			}
		}
	}()
	return func() int64 { close(stop); return <-done }
}

// checkSessions makes sure every session measured was still logged in.
func checkSessions(ctx context.Context, nd *node, n int) error {
	v, err := nd.ej.Eval(ctx, "length(ejabberd_sm:dirty_get_sessions_list())")
	if err != nil {
		return err
	}
	if strings.TrimSpace(v) != strconv.Itoa(n) {
		return fmt.Errorf("%s of %d sessions still logged in after the idle wait", strings.TrimSpace(v), n)
	}
	return nil
}

// settle waits until the node is back to no session and its baseline
// processes, so that the next phase starts from the same place.
func settle(ctx context.Context, nd *node) error {
	if err := waitSessions(ctx, nd.ej, 0); err != nil {
		return err
	}
	return waitProcesses(ctx, nd.ej, nd.baseline+20)
}

// loginAttempts: a login that fails is tried again (and counted), as a
// real client would; one that fails every time fails the run.
const loginAttempts = 3

// loginAll logs users prefix<first>..prefix<first+n-1> in over t with
// c.workers logins at a time, and returns the sessions, the time taken and
// how many logins needed another attempt.
func loginAll(ctx context.Context, c config, t loadgen.Target, prefix string, first, n int) ([]loadgen.Session, time.Duration, int, error) {
	sessions := make([]loadgen.Session, n)
	var next, retried atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < c.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				var s loadgen.Session
				var err error
				for attempt := 1; attempt <= loginAttempts; attempt++ {
					if s, err = loadgen.Login(ctx, c.dialer, t, prefix+strconv.Itoa(first+i), "pw"); err == nil {
						break
					}
					retried.Add(1)
				}
				if err != nil {
					once.Do(func() { firstErr = err })
					next.Store(int64(n)) // the other workers stop too
					return
				}
				sessions[i] = s
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if firstErr != nil {
		closeAll(sessions)
		return nil, 0, 0, fmt.Errorf("login over %s at %s (%d attempts): %w", t.Kind, t.Addr, loginAttempts, firstErr)
	}
	return sessions, took, int(retried.Load()), nil
}

// closeAll logs every session out, a few at a time (a BOSH logout is an
// HTTP request of its own).
func closeAll(sessions []loadgen.Session) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(sessions) {
					return
				}
				if sessions[i] != nil {
					sessions[i].Close()
				}
			}
		}()
	}
	wg.Wait()
}
