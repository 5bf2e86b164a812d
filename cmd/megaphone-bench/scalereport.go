package main

import (
	"fmt"
	"strings"
	"time"
)

// renderScale writes the scale run's Markdown report: per ramp, the state
// at each step, then the cost per session over the idle baseline.
func renderScale(s *scaleConfig, results []scaleResult, failures []string, took time.Duration) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("# megaphone-bench: scale run\n\n%s; %s, took %s.\n\n", machine(), time.Now().UTC().Format("2006-01-02 15:04 UTC"), took.Round(time.Second))
	w("Idle TCP sessions (SASL PLAIN, bind, presence), ramped in steps; guards: MemAvailable ≥ %s, failed logins ≤ %.1f%% of a step (at least 10). ",
		gib(s.memFloor), 100*s.maxFailShare)
	w("The shim sweeps idle c2s every %s; each step idles %s before it is measured (no forced GC).\n\n", s.sweep, s.settle)
	for _, r := range results {
		w("## %s\n\n", pathName(r.megaphone))
		if r.megaphone {
			w("%d sidecars with `--reuseport` on one port, ", r.sidecars)
		} else {
			w("ejabberd's own `ejabberd_c2s` listener, ")
		}
		w("%d load-generator processes; %d users registered in one rpc loop in %s.\n\n", r.workers, r.users, r.registerTook.Round(time.Second))
		w("| step | in ejabberd | clients hold | failed | retried | logins/s | beam schedulers busy | beam RSS | Erlang mem | of which processes | ETS | Erlang procs | sidecar RSS (sum) | sidecar fds min-max | load gen RSS | kernel sockets (both ends) | MemAvailable |\n")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		row := func(name string, x scaleRow) {
			fds := "-"
			if x.sidecars > 0 {
				fds = fmt.Sprintf("%d-%d", x.fdMin, x.fdMax)
			}
			sessions, erl, procs, ets, nprocs := fmt.Sprint(x.sessions), mib(x.erlTotal), mib(x.erlProcs), mib(x.erlETS), fmt.Sprint(x.processes)
			if x.unreachable != "" {
				sessions, erl, procs, ets, nprocs = "?", "?", "?", "?", "?"
			}
			w("| %s | %s | %d | %d | %d | %.0f | %.0f%% | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, sessions, x.held, x.failed, x.retried, x.loginRate, 100*x.schedBusy,
				mib(x.beamRSS), erl, procs, ets, nprocs, mib(x.sidecarRSS), fds, mib(x.workerRSS), mib(x.kernel), mib(x.memAvail))
		}
		row("baseline", r.base)
		for _, x := range r.rows {
			row(fmt.Sprint(x.step), x)
		}
		w("\nPer session over the baseline, KiB (kernel: the server's half of both ends):\n\n")
		w("| sessions | beam RSS | Erlang mem | sidecar RSS | kernel | **server total** | load gen RSS |\n|---|---|---|---|---|---|---|\n")
		for _, x := range r.rows {
			if x.sessions <= 0 {
				continue
			}
			per := func(v, base int64) float64 { return float64(v-base) / float64(x.sessions) / 1024 }
			beam, side, kern := per(x.beamRSS, r.base.beamRSS), per(x.sidecarRSS, r.base.sidecarRSS), per(x.kernel, r.base.kernel)/2
			w("| %d | %.1f | %.1f | %.1f | %.1f | **%.1f** | %.1f |\n", x.sessions, beam, per(x.erlTotal, r.base.erlTotal), side, kern,
				beam+side+kern, per(x.workerRSS, r.base.workerRSS))
		}
		for _, x := range r.rows {
			if x.unreachable != "" {
				w("\nAt step %d the node did not answer (its figures are ?): %s\n", x.step, x.unreachable)
			}
		}
		if r.stopped != "" {
			w("\n**Stopped short of %d**: %s.\n", r.target, r.stopped)
		} else {
			w("\nReached %d.\n", r.target)
		}
		w("Logout of everything took %s; %d sessions left in ejabberd's table after it.\n\n", r.logoutTook.Round(time.Second), r.logoutLeft)
	}
	if len(failures) > 0 {
		w("## Failed\n\n")
		for _, f := range failures {
			w("- %s\n", f)
		}
	}
	return b.String()
}

func mib(v int64) string { return fmt.Sprintf("%.0f MiB", float64(v)/(1<<20)) }
