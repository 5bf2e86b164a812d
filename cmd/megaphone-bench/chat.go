package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
)

// chatResult is one path's 1:1 chat figures for one transport.
type chatResult struct {
	kind      transport
	megaphone bool
	pairs     int
	loginRate float64 // logins/s of the 2×pairs chatters
	// Saturated: each pair keeps one message in flight (send, wait for
	// delivery, send the next).
	rate     float64 // messages delivered per second
	p50, p99 time.Duration
	// Paced: each pair sends at a fixed rate whatever happens.
	pacedRate          float64 // offered messages per second, all pairs
	pacedP50, pacedP99 time.Duration
	lost               int     // paced messages not delivered within the grace
	cpu                chatCPU // saturated phase, per message
}

// phase tags each message so that a late delivery counts in its own phase.
const (
	saturated = "s"
	paced     = "p"
)

// chatPhase logs in users b1..b<2×pairs> (b1 sends to b2, b3 to b4, ...)
// and measures both phases.
func chatPhase(ctx context.Context, c config, nd *node, sidecarPid int, kind transport, t loadgen.Target) (chatResult, error) {
	r := chatResult{pairs: c.pairs}
	sessions, took, _, err := loginAll(ctx, c, t, "b", 1, 2*c.pairs)
	if err != nil {
		return r, err
	}
	defer closeAll(sessions) // the node stops next: no need to wait for it to settle
	r.loginRate = float64(len(sessions)) / took.Seconds()

	epoch := time.Now()
	var mu sync.Mutex
	latencies := map[string][]time.Duration{}
	delivered := make([]chan struct{}, c.pairs)
	var receiving sync.WaitGroup
	for p := 0; p < c.pairs; p++ {
		delivered[p] = make(chan struct{}, 1)
		receiving.Add(1)
		go func(p int) {
			defer receiving.Done()
			var mine []time.Duration
			var mineTags []string
			_ = sessions[2*p+1].Receive(func(body string) {
				tag, at, ok := strings.Cut(body, ":")
				ns, err := strconv.ParseInt(at, 10, 64)
				if !ok || err != nil {
					return
				}
				mine = append(mine, time.Since(epoch)-time.Duration(ns))
				mineTags = append(mineTags, tag)
				select {
				case delivered[p] <- struct{}{}:
				default:
				}
			})
			mu.Lock()
			for i, d := range mine {
				latencies[mineTags[i]] = append(latencies[mineTags[i]], d)
			}
			mu.Unlock()
		}(p)
	}
	to := func(p int) string { return "b" + strconv.Itoa(2*p+2) + "@localhost" }
	stamp := func(tag string) string { return tag + ":" + strconv.FormatInt(int64(time.Since(epoch)), 10) }

	// Saturated: one message in flight per pair.
	var sent atomic.Int64
	var failed atomic.Value
	var senders sync.WaitGroup
	cpuBefore := sampleCPU(nd.ej.Pid, sidecarPid)
	end := time.Now().Add(c.chatFor)
	for p := 0; p < c.pairs; p++ {
		senders.Add(1)
		go func(p int) {
			defer senders.Done()
			for time.Now().Before(end) {
				if err := sessions[2*p].Send(loadgen.ChatMessage(to(p), stamp(saturated))); err != nil {
					failed.Store(err)
					return
				}
				sent.Add(1)
				select {
				case <-delivered[p]:
				case <-time.After(10 * time.Second):
					failed.Store(fmt.Errorf("pair %d: no delivery within 10 s", p))
					return
				}
			}
		}(p)
	}
	senders.Wait()
	satCount := sent.Load()
	r.rate = float64(satCount) / c.chatFor.Seconds()
	r.cpu = perMessage(cpuBefore, sampleCPU(nd.ej.Pid, sidecarPid), satCount)

	// Paced: every pair sends pacedRate messages a second, staggered.
	interval := time.Duration(float64(time.Second) / c.pacedRate)
	perPair := int(c.chatFor.Seconds() * c.pacedRate)
	r.pacedRate = c.pacedRate * float64(c.pairs)
	var pacedSent atomic.Int64
	for p := 0; p < c.pairs; p++ {
		senders.Add(1)
		go func(p int) {
			defer senders.Done()
			time.Sleep(time.Duration(p) * interval / time.Duration(c.pairs))
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for i := 0; i < perPair; i++ {
				if err := sessions[2*p].Send(loadgen.ChatMessage(to(p), stamp(paced))); err != nil {
					failed.Store(err)
					return
				}
				pacedSent.Add(1)
				<-tick.C
			}
		}(p)
	}
	senders.Wait()
	time.Sleep(2 * time.Second) // stragglers
	for p := 0; p < c.pairs; p++ {
		sessions[2*p+1].Close()
	}
	receiving.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return r, err
	}
	sat, pc := latencies[saturated], latencies[paced]
	if len(sat) == 0 || len(pc) == 0 {
		return r, errors.New("no message delivered")
	}
	r.p50, r.p99 = percentile(sat, 50), percentile(sat, 99)
	r.pacedP50, r.pacedP99 = percentile(pc, 50), percentile(pc, 99)
	r.lost = int(pacedSent.Load()) - len(pc)
	fmt.Printf("%s %s chat: %.0f msg/s, p50 %v p99 %v; paced %.0f msg/s p50 %v p99 %v, %d lost\n", kind, t.Addr,
		r.rate, r.p50, r.p99, r.pacedRate, r.pacedP50, r.pacedP99, r.lost)
	return r, nil
}

func percentile(ds []time.Duration, p float64) time.Duration {
	sorted := append([]time.Duration(nil), ds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}
