package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
	"github.com/megaphone-im/megaphone/test/harness"
)

// The scale run (make bench-scale, issue 7): one ejabberd, K sidecars
// sharing one port with SO_REUSEPORT (each its own hidden node), P load
// generator processes (scaleworker.go); idle TCP sessions ramp up in steps
// towards a target, and each step records where the memory goes. The same
// ramp through ejabberd's own TCP listener finds native's ceiling: the
// node's open-files limit, 20,000 here.
//
// The machine is guarded: the ramp stops when MemAvailable falls below a
// floor, when more logins fail than a small share, when a part dies, or on
// SIGINT/SIGTERM, and then everything logs out and the report is written. Every loop is bounded by the step count
// and every wait by a deadline.

// scaleConfig is the scale run's settings.
type scaleConfig struct {
	target, nativeTarget  int   // sessions to ramp to (0: that path is not run)
	steps, nativeSteps    []int // the sessions at which the ramp stops to measure
	perSidecar, perWorker int   // sessions per process the ramp plans for
	chunk                 int   // logins per worker between two guard checks
	memFloor              int64 // bytes of MemAvailable below which the ramp stops
	maxFailShare          float64
	settle                time.Duration // idle after a step, before measuring
	sweep                 time.Duration // the shim's idle-c2s sweep interval
	keepAlive             time.Duration // the sidecars' --tcp-keepalive
	on                    bool          // -scale or -scale-native was given: this is a scale run
	interrupted           atomic.Value  // the signal that asked the ramp to stop, as a string
}

// scaleFlags defines the scale run's flags; finish completes the settings
// once the flags are parsed.
func scaleFlags() (s *scaleConfig, finish func() error) {
	s = &scaleConfig{}
	flag.IntVar(&s.target, "scale", 0, "scale run: ramp idle TCP sessions through K sidecars with --reuseport up to this many (0: not)")
	steps := flag.String("scale-steps", "20000,50000,100000,150000,200000,250000", "scale run: where the ramp stops to measure (steps above -scale are dropped; -scale is always the last)")
	flag.IntVar(&s.nativeTarget, "scale-native", 30000, "scale run: ramp ejabberd's own TCP listener up to this many too (0: not); given alone, only the native ramp runs")
	nativeSteps := flag.String("scale-native-steps", "5000,10000,15000,19000,20000,25000", "scale run: the native ramp's steps")
	flag.IntVar(&s.perSidecar, "scale-per-sidecar", 16000, "scale run: sessions planned per sidecar (K = target / this; the kernel's hash spreads them unevenly, so keep it under the open-files limit)")
	flag.IntVar(&s.perWorker, "scale-per-worker", 18500, "scale run: most sessions one load generator process holds")
	flag.IntVar(&s.chunk, "scale-chunk", 250, "scale run: logins per worker between two checks of the guards")
	floor := flag.Float64("scale-mem-floor", 3, "scale run: stop ramping when MemAvailable falls below this many GiB")
	flag.Float64Var(&s.maxFailShare, "scale-max-fail", 0.005, "scale run: stop ramping when more than this share of a step's logins fail (and at least 10)")
	flag.DurationVar(&s.settle, "scale-settle", 25*time.Second, "scale run: idle after each step before measuring (at least two sweeps)")
	flag.DurationVar(&s.keepAlive, "scale-tcp-keepalive", 5*time.Minute, "scale run: the sidecars' --tcp-keepalive (at 15 s, 250,000 connections' probes overflowed loopback's packet backlog)")
	flag.DurationVar(&s.sweep, "scale-sweep", 10*time.Second, "scale run: the shim's idle-c2s sweep interval")
	finish = func() error {
		flag.Visit(func(f *flag.Flag) { s.on = s.on || f.Name == "scale" || f.Name == "scale-native" })
		var err error
		s.memFloor = int64(*floor * (1 << 30))
		if s.steps, err = parseSteps(*steps, s.target); err == nil {
			s.nativeSteps, err = parseSteps(*nativeSteps, s.nativeTarget)
		}
		return err
	}
	return s, finish
}

// parseSteps keeps the steps below target, and ends with target.
func parseSteps(s string, target int) ([]int, error) {
	if target <= 0 {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad step %q", f)
		}
		if n < target && (len(out) == 0 || n > out[len(out)-1]) {
			out = append(out, n)
		}
	}
	return append(out, target), nil
}

// scaleRow is the state of the machine at one step of a ramp.
type scaleRow struct {
	step, held, sessions int // planned; held by the clients; in ejabberd's session table
	failed, retried      int // in this step
	loginRate            float64
	beamRSS              int64
	erlTotal, erlProcs   int64
	erlETS, erlBinary    int64
	processes            int
	sidecars             int
	sidecarRSS           int64
	fdMin, fdMax         int // open files of the least and most loaded sidecar
	workerRSS            int64
	kernel               int64 // both ends of every loopback socket
	memAvail             int64
	at                   time.Time
	unreachable          string  // why the node could not be asked (its figures are then unknown)
	schedBusy            float64 // share of the node's scheduler time busy while this step logged in
}

// scaleResult is one ramp.
type scaleResult struct {
	megaphone     bool
	sidecars      int
	workers       int
	base          scaleRow
	rows          []scaleRow
	stopped       string // why the ramp ended short of its target ("" if it reached it)
	registerTook  time.Duration
	logoutTook    time.Duration
	logoutLeft    int // sessions still in ejabberd's table after the logout wait
	target, users int
}

func runScale(ctx context.Context, c config, s *scaleConfig) error {
	cleanup, err := withCert(&c, "megaphone-bench-scale-")
	if err != nil {
		return err
	}
	defer cleanup()
	// SIGINT or SIGTERM stops the ramp at its next check, as the guards
	// do: everything logs out and the report is still written.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		if sig, ok := <-sigs; ok {
			s.interrupted.Store(sig.String())
		}
	}()
	started := time.Now()
	var results []scaleResult
	var failures []string
	for _, megaphone := range []bool{true, false} {
		if s.interrupted.Load() != nil {
			break
		}
		target, steps := s.target, s.steps
		if !megaphone {
			target, steps = s.nativeTarget, s.nativeSteps
		}
		if target <= 0 {
			continue
		}
		r, err := scaleRamp(ctx, c, s, megaphone, target, steps)
		if err != nil {
			failures = append(failures, fmt.Sprintf("%s ramp: %v", pathName(megaphone), err))
			fmt.Fprintln(os.Stderr, "megaphone-bench:", failures[len(failures)-1])
		}
		if len(r.rows) > 0 {
			results = append(results, r)
		}
		// The report so far, in case a later ramp is cut short.
		if c.out != "" {
			_ = os.WriteFile(c.out, []byte(renderScale(s, results, failures, time.Since(started))), 0o644)
		}
	}
	report := renderScale(s, results, failures, time.Since(started))
	if err := publish(c, report); err != nil {
		return err
	}
	if len(failures) > 0 {
		return fmt.Errorf("%d ramp(s) failed", len(failures))
	}
	return nil
}

// scaleRamp runs one path's ramp: a node, its sidecars, the workers, the
// steps, the logout.
func scaleRamp(ctx context.Context, c config, s *scaleConfig, megaphone bool, target int, steps []int) (scaleResult, error) {
	r := scaleResult{megaphone: megaphone, target: target}
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "scale %s: %s\n", pathName(megaphone), fmt.Sprintf(format, a...))
	}
	// Failed logins use up user names (a failed user is not tried again
	// later), hence the margin.
	r.users = target + target/20 + 100
	t0 := time.Now()
	nd, err := startNode(ctx, c, 0, harness.Options{
		BOSHInactivity: boshInactivity,
		// One c2s process a session, and the node's own besides.
		MaxProcesses: max(250000, 2*target+100000),
		// ejabberd's caches (users, sessions' last activity, ...) hold
		// 1000 entries by default; at 100,000 sessions it logged that they
		// shrink all the time. A production node this size raises it too.
		ExtraConfig: fmt.Sprintf("cache_size: %d\n", r.users),
	})
	if err != nil {
		return r, err
	}
	defer nd.ej.Stop()
	if err := registerMany(ctx, nd.ej, "b", "pw", r.users); err != nil {
		return r, err
	}
	r.registerTook = time.Since(t0)
	logf("node %s up, %d users registered in %s", nd.ej.Node, r.users, r.registerTook.Round(time.Second))
	if _, err := nd.ej.Eval(ctx, fmt.Sprintf("application:set_env(megaphone, gc_sweep_interval, %d)", s.sweep.Milliseconds())); err != nil {
		return r, err
	}

	addr := fmt.Sprintf("127.0.0.1:%d", nd.ej.C2SPort)
	var sidecars []*sidecar
	defer func() {
		for _, sc := range sidecars {
			sc.stop()
		}
	}()
	if megaphone {
		port, err := harness.FreePort()
		if err != nil {
			return r, err
		}
		addr = fmt.Sprintf("127.0.0.1:%d", port)
		r.sidecars = (target + s.perSidecar - 1) / s.perSidecar
		t := loadgen.Target{Kind: loadgen.TCP, Addr: addr, Domain: "localhost"}
		for i := 0; i < r.sidecars; i++ {
			// --max-conns below the open-files limit: a sidecar the hash
			// overfills refuses the connection (the client retries and
			// lands elsewhere) instead of running out of descriptors.
			args := nd.sidecarArgs("--c2s-addr", addr, "--bosh-addr", "", "--reuseport", "--max-conns", "19500",
				"--tcp-keepalive", s.keepAlive.String())
			sc, err := launchSidecar(ctx, c, nd, args, t)
			if err != nil {
				return r, fmt.Errorf("sidecar %d of %d: %w", i+1, r.sidecars, err)
			}
			sidecars = append(sidecars, sc)
		}
		logf("%d sidecars share %s", r.sidecars, addr)
	}

	r.workers = (target + s.perWorker - 1) / s.perWorker
	workers, err := startScaleWorkers(r.workers, addr, max(2, 48/r.workers))
	if err != nil {
		return r, err
	}
	defer func() {
		for _, w := range workers {
			w.stop()
		}
	}()

	if r.base, err = scaleMeasure(ctx, nd, sidecars, workers); err != nil || r.base.unreachable != "" {
		return r, fmt.Errorf("baseline: %v %s", err, r.base.unreachable)
	}
	r.logoutLeft = -1
	nextUser := 1
	held := make([]int, len(workers))
	total := 0
	// Scheduler wall time counts while a process on the node asks for
	// it: one waits there until the node stops.
	if _, err := nd.ej.Eval(ctx, `spawn(fun() -> erlang:system_flag(scheduler_wall_time, true), receive stop -> ok end end), ok`); err != nil {
		return r, err
	}
	for _, step := range steps {
		stepStart, stepHeld := time.Now(), total
		busyFrom, _ := schedulerBusy(ctx, nd)
		failed, retried := 0, 0
		// Each worker's share of the step, so that all log in at once.
		quota := min(s.perWorker, (step+len(workers)-1)/len(workers))
		maxFail := max(10, int(s.maxFailShare*float64(step-stepHeld)))
		for round := 0; total < step && r.stopped == ""; round++ {
			if round > step/len(workers)/max(1, s.chunk)+len(workers)+10 {
				r.stopped = fmt.Sprintf("no progress towards %d after %d rounds", step, round)
				break
			}
			cmds := make([]string, len(workers))
			for i := range workers {
				n := min(s.chunk, quota-held[i], step-total)
				if n <= 0 {
					continue
				}
				cmds[i] = fmt.Sprintf("login %d %d %d", nextUser, n, maxFail-failed)
				nextUser += n
				total += n // planned; corrected by the answers below
				held[i] += n
			}
			answers, err := askAll(workers, cmds, 10*time.Minute)
			if err != nil {
				return r, err
			}
			for i, a := range answers {
				if cmds[i] == "" {
					continue
				}
				var ok, fl, rt, ms int
				if _, err := fmt.Sscanf(a, "done %d %d %d %d", &ok, &fl, &rt, &ms); err != nil {
					return r, fmt.Errorf("worker %d: %q", i, a)
				}
				var n int
				fmt.Sscanf(cmds[i], "login %d %d", new(int), &n)
				total -= n - ok
				held[i] -= n - ok
				failed += fl
				retried += rt
				if fl > 0 && failed >= maxFail {
					first := ""
					if f := strings.Fields(a); len(f) > 5 {
						first = strings.Join(f[5:], " ")
					}
					r.stopped = fmt.Sprintf("%d logins failed on the way to %d (first: %s)", failed, step, first)
				}
			}
			if nextUser+s.chunk*len(workers) > r.users && total < step && r.stopped == "" {
				r.stopped = fmt.Sprintf("out of registered users at %d sessions", total)
			}
			if r.stopped == "" {
				r.stopped = guard(s, nd, sidecars)
			}
		}
		took := time.Since(stepStart)
		busyTo, busyErr := schedulerBusy(ctx, nd)
		logf("step %d: %d sessions held (%d failed, %d retried) in %s", step, total, failed, retried, took.Round(time.Second))
		if r.stopped == "" {
			time.Sleep(s.settle)
		}
		row, err := scaleMeasure(ctx, nd, sidecars, workers)
		if err != nil {
			return r, err
		}
		row.step, row.held, row.failed, row.retried = step, total, failed, retried
		row.loginRate = float64(total-stepHeld) / took.Seconds()
		if busyErr == nil && busyTo[1] > busyFrom[1] {
			row.schedBusy = float64(busyTo[0]-busyFrom[0]) / float64(busyTo[1]-busyFrom[1])
		}
		r.rows = append(r.rows, row)
		if row.unreachable != "" {
			logf("step %d: the node did not answer: %s", step, row.unreachable)
		}
		logf("step %d measured: %d in ejabberd, beam RSS %s, sidecars %s, clients %s, kernel %s, MemAvailable %s",
			step, row.sessions, gib(row.beamRSS), gib(row.sidecarRSS), gib(row.workerRSS), gib(row.kernel), gib(row.memAvail))
		if r.stopped != "" {
			logf("stopped: %s", r.stopped)
			break
		}
	}

	// Everything logs out, and ejabberd's session table empties.
	t0 = time.Now()
	if _, err := askAll(workers, repeat("close", len(workers)), 10*time.Minute); err != nil {
		return r, err
	}
	for deadline := time.Now().Add(5 * time.Minute); time.Now().Before(deadline); {
		if n, err := evalInt(ctx, nd.ej, "mnesia:table_info(session, size)"); err == nil {
			r.logoutLeft = n
			if n == 0 {
				break
			}
		}
		time.Sleep(time.Second)
	}
	r.logoutTook = time.Since(t0)
	logf("logged out in %s (%d sessions left)", r.logoutTook.Round(time.Second), r.logoutLeft)
	return r, nil
}

// registerMany registers prefix1..prefixN (password pw) in one rpc loop.
// The first goes through ejabberd_auth:try_register/3; the others copy
// its record with a dirty write each, which is some 50 times faster than
// a transaction per user (250,000 users in seconds rather than a quarter
// of an hour) and leaves the record's shape to the installed ejabberd.
func registerMany(ctx context.Context, ej *harness.Ejabberd, prefix, pw string, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	v, err := ej.Eval(ctx, fmt.Sprintf(`Host = <<"localhost">>, Pw = <<%q>>,
	    Name = fun(I) -> <<%q, (integer_to_binary(I))/binary>> end,
	    ok = case ejabberd_auth:try_register(Name(1), Host, Pw) of {error, exists} -> ok; R -> R end,
	    [Rec] = mnesia:dirty_read(passwd, {Name(1), Host}),
	    lists:foreach(fun(I) -> ok = mnesia:dirty_write(setelement(2, Rec, {Name(I), Host})) end, lists:seq(2, %d)),
	    {mnesia:table_info(passwd, size), ejabberd_auth:user_exists(Name(%d), Host)}`, pw, prefix, n, n))
	if err != nil {
		return err
	}
	if strings.TrimSpace(v) != fmt.Sprintf("{%d,true}", n) {
		return fmt.Errorf("registering %d users: %s", n, v)
	}
	return nil
}

// schedulerBusy is the node's schedulers' summed {active, total} wall time
// so far: the share of the difference between two readings is how busy
// beam was in between.
func schedulerBusy(ctx context.Context, nd *node) ([2]int64, error) {
	var out [2]int64
	v, err := nd.ej.Eval(ctx, `N = erlang:system_info(schedulers),
	    lists:foldl(fun({I, A, T}, {SA, ST}) when I =< N -> {SA + A, ST + T}; (_, Acc) -> Acc end,
	                {0, 0}, erlang:statistics(scheduler_wall_time))`)
	if err != nil {
		return out, err
	}
	_, err = fmt.Sscanf(strings.TrimSpace(v), "{%d,%d}", &out[0], &out[1])
	return out, err
}

// guard says why the ramp must stop now, or "".
func guard(s *scaleConfig, nd *node, sidecars []*sidecar) string {
	if sig, ok := s.interrupted.Load().(string); ok {
		return "stopped by the operator (" + sig + ")"
	}
	if avail := meminfo("MemAvailable"); avail < s.memFloor {
		return fmt.Sprintf("MemAvailable %s fell below the %s floor", gib(avail), gib(s.memFloor))
	}
	if !nd.ej.Alive() {
		return "the ejabberd node exited"
	}
	for _, sc := range sidecars {
		if exited(sc.pid()) {
			return fmt.Sprintf("sidecar pid %d exited", sc.pid())
		}
	}
	return ""
}

// exited says a child has ended (gone, or a zombie nobody has reaped yet).
func exited(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	_, after, ok := strings.Cut(string(b), ") ")
	return !ok || strings.HasPrefix(after, "Z") || strings.HasPrefix(after, "X")
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

func gib(b int64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) }

func evalInt(ctx context.Context, ej *harness.Ejabberd, expr string) (int, error) {
	v, err := ej.Eval(ctx, expr)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(v))
}

// scaleMeasure reads the node, the sidecars, the workers, the kernel.
// No forced GC: the sessions are measured as they sit (the shim's sweep
// has collected them).
func scaleMeasure(ctx context.Context, nd *node, sidecars []*sidecar, workers []*scaleWorkerProc) (scaleRow, error) {
	row := scaleRow{at: time.Now(), sidecars: len(sidecars), fdMin: -1, sessions: -1}
	row.beamRSS = rss(nd.ej.Pid)
	// A node out of descriptors cannot take the probe's connection: the
	// rest is still measured, and the row says why the node's part is not.
	ectx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	v, err := nd.ej.Eval(ectx, `{mnesia:table_info(session, size), erlang:memory(total), erlang:memory(processes),
	    erlang:memory(ets), erlang:memory(binary), erlang:system_info(process_count)}`)
	f := strings.FieldsFunc(v, func(r rune) bool { return r == '{' || r == '}' || r == ',' || r == ' ' || r == '\n' })
	switch {
	case err != nil:
		row.unreachable = firstLine(err.Error())
	case len(f) != 6:
		row.unreachable = fmt.Sprintf("unexpected %q", v)
	default:
		ints := make([]int64, len(f))
		for i := range f {
			ints[i], _ = strconv.ParseInt(f[i], 10, 64)
		}
		row.sessions, row.erlTotal, row.erlProcs, row.erlETS, row.erlBinary, row.processes =
			int(ints[0]), ints[1], ints[2], ints[3], ints[4], int(ints[5])
	}
	for _, sc := range sidecars {
		row.sidecarRSS += rss(sc.pid())
		fds := openFiles(sc.pid())
		if row.fdMin < 0 || fds < row.fdMin {
			row.fdMin = fds
		}
		row.fdMax = max(row.fdMax, fds)
	}
	for _, w := range workers {
		row.workerRSS += rss(w.cmd.Process.Pid)
	}
	row.kernel = kernelTCPBuffers() + kernelSocketSlabs()
	row.memAvail = meminfo("MemAvailable")
	return row, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func openFiles(pid int) int {
	entries, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	return len(entries)
}

// scaleWorkerProc is one load generator process this run started.
type scaleWorkerProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

// startScaleWorkers starts n workers, each dialing addr from its own two
// loopback source addresses (127.0.0.10 and up: the other benchmarks use
// 127.0.0.2-9), each with its own ephemeral ports.
func startScaleWorkers(n int, addr string, inflight int) ([]*scaleWorkerProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	const sourcesEach = 2
	if 10+n*sourcesEach > 254 {
		return nil, fmt.Errorf("%d workers need more loopback source addresses than 127.0.0.10-254", n)
	}
	var ws []*scaleWorkerProc
	for i := 0; i < n; i++ {
		cmd := exec.Command(self, scaleWorkerCommand, "-addr", addr, "-source-first", strconv.Itoa(10+i*sourcesEach),
			"-sources", strconv.Itoa(sourcesEach), "-inflight", strconv.Itoa(inflight))
		cmd.Stderr = os.Stderr
		// A process group of its own: a Ctrl-C reaches the parent only,
		// which stops the ramp and logs the sessions out through us.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
		in, err := cmd.StdinPipe()
		if err == nil {
			var out io.ReadCloser
			if out, err = cmd.StdoutPipe(); err == nil {
				if err = cmd.Start(); err == nil {
					ws = append(ws, &scaleWorkerProc{cmd: cmd, in: in, out: bufio.NewReader(out)})
					continue
				}
			}
		}
		for _, w := range ws {
			w.stop()
		}
		return nil, err
	}
	return ws, nil
}

// askAll sends each worker its command ("" for none) and waits for every
// answer, at most limit.
func askAll(ws []*scaleWorkerProc, cmds []string, limit time.Duration) ([]string, error) {
	type answer struct {
		i    int
		line string
		err  error
	}
	ch := make(chan answer, len(ws))
	asked := 0
	for i, w := range ws {
		if cmds[i] == "" {
			continue
		}
		asked++
		go func() {
			if _, err := io.WriteString(w.in, cmds[i]+"\n"); err != nil {
				ch <- answer{i, "", err}
				return
			}
			line, err := w.out.ReadString('\n')
			ch <- answer{i, strings.TrimSpace(line), err}
		}()
	}
	out := make([]string, len(ws))
	deadline := time.After(limit)
	for k := 0; k < asked; k++ {
		select {
		case a := <-ch:
			if a.err != nil {
				return nil, fmt.Errorf("worker %d (pid %d): %w", a.i, ws[a.i].cmd.Process.Pid, a.err)
			}
			out[a.i] = a.line
		case <-deadline:
			return nil, fmt.Errorf("workers did not answer within %s", limit)
		}
	}
	return out, nil
}

// stop ends the worker this run started: end of input logs its sessions
// out and it exits; a worker that hangs is killed by its own PID.
func (w *scaleWorkerProc) stop() {
	_ = w.in.Close()
	waitOrKill(w.cmd, 2*time.Minute)
}

// waitOrKill waits up to limit for a child this run started to exit, then
// kills it by its own PID.
func waitOrKill(cmd *exec.Cmd, limit time.Duration) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
		_ = cmd.Process.Kill()
		<-done
	}
}
