package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
	"github.com/megaphone-im/megaphone/test/harness"
)

// The fixed ports bench/tsung/*.xml point at: ejabberd's own listeners and
// the sidecar's, all on 127.0.0.1.
const (
	tsungNativeC2S     = 15222
	tsungNativeHTTP    = 15280
	tsungMegaphoneC2S  = 25222
	tsungMegaphoneHTTP = 25280
)

var maxUsersAttr = regexp.MustCompile(`maxnumber="(\d+)"`)

// runTsung runs every scenario in c.tsungDir in turn against both paths
// served on the fixed ports, with tsung1..tsungN registered in one loop on
// the node, measuring the node, the sidecar and the kernel while Tsung's
// users sit idle: the same figures as the Go load generator's, from an
// outside tool.
func runTsung(ctx context.Context, c config) error {
	if _, err := exec.LookPath("tsung"); err != nil {
		return fmt.Errorf("tsung not found (scripts/bench-deps.sh installs it): %w", err)
	}
	scenarios, err := filepath.Glob(filepath.Join(c.tsungDir, "*.xml"))
	if err != nil || len(scenarios) == 0 {
		return fmt.Errorf("no Tsung scenarios in %s", c.tsungDir)
	}
	sort.Strings(scenarios)
	cleanup, err := withCert(&c, "megaphone-tsung-")
	if err != nil {
		return err
	}
	defer cleanup()
	// Tsung's logs outlive the run, for a look at what it saw.
	logs, err := os.MkdirTemp("", "megaphone-tsung-logs-")
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "Tsung logs in", logs)
	var rows []string
	for _, file := range scenarios {
		row, err := tsungScenario(ctx, c, file, filepath.Join(logs, strings.TrimSuffix(filepath.Base(file), ".xml")))
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		rows = append(rows, row)
		fmt.Fprintln(os.Stderr, row)
	}
	report := fmt.Sprintf(`## Tsung 1.7 scenarios (%s)

Each scenario in %s runs against a fresh node and sidecar, logs its users in
and holds them idle; the bench measures while they sit (KiB per session,
growth over the baseline / sessions seen: Tsung draws user names at random,
so a name drawn twice replaces its earlier session). Total = beam RSS +
sidecar RSS + kernel.

| scenario | sessions | beam RSS | Erlang mem | Erlang mem after GC | sidecar RSS | kernel | **total** | Erlang procs | what Tsung saw |
|---|---|---|---|---|---|---|---|---|---|
%s

Machine: %s. Other work may have been running on the machine at the same time.
`, time.Now().UTC().Format("2006-01-02 15:04 MST"), c.tsungDir, strings.Join(rows, "\n"), machine())
	return publish(c, report)
}

// tsungScenario runs one scenario against a fresh node and sidecar (as
// the Go load generator's sides do, so that no scenario grows into
// another's leftovers), both paths served on the fixed ports.
func tsungScenario(ctx context.Context, c config, file, logDir string) (string, error) {
	nd, err := startNode(ctx, c, 1, harness.Options{C2SPort: tsungNativeC2S, HTTPPort: tsungNativeHTTP})
	if err != nil {
		return "", err
	}
	defer nd.ej.Stop()
	if err := registerUsers(ctx, nd.ej, "tsung", "pw", c.tsungUsers, true); err != nil {
		return "", err
	}
	c2s := fmt.Sprintf("127.0.0.1:%d", tsungMegaphoneC2S)
	sc, err := launchSidecar(ctx, c, nd, nd.sidecarArgs("--c2s-addr", c2s, "--bosh-addr", fmt.Sprintf("127.0.0.1:%d", tsungMegaphoneHTTP)),
		loadgen.Target{Addr: c2s})
	if err != nil {
		return "", err
	}
	defer sc.stop()
	// The sidecar's own processes belong to the baseline.
	v, err := nd.ej.Eval(ctx, "erlang:system_info(process_count)")
	if err != nil {
		return "", err
	}
	nd.baseline, _ = strconv.Atoi(strings.TrimSpace(v))
	return runScenario(ctx, nd, sc, file, logDir, minIdle(c.sweep))
}

func runScenario(ctx context.Context, nd *node, sc *sidecar, file, logDir string, idle time.Duration) (string, error) {
	text, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	m := maxUsersAttr.FindSubmatch(text)
	if m == nil {
		return "", fmt.Errorf("no maxnumber in the scenario")
	}
	users, _ := strconv.Atoi(string(m[1]))
	base, err := measure(ctx, nd.ej, sc.pid())
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return "", err
	}
	cmd := exec.Command("tsung", "-f", file, "-l", logDir, "start")
	log, err := os.Create(logDir + ".log")
	if err != nil {
		return "", err
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// Kill Tsung's process group (its controller VM is its child) if it
	// overruns; it started it, so this ends only what this run started.
	stopTsung := func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}

	// Wait for the plateau: every user logged in, or no new session for
	// 10 s (Tsung's BOSH client loses some users), bounded.
	sessions, grew := 0, time.Now()
	for i := 0; i < 240 && sessions < users && (sessions == 0 || time.Since(grew) < 10*time.Second); i++ {
		v, err := nd.ej.Eval(ctx, "length(ejabberd_sm:dirty_get_sessions_list())")
		if k, perr := strconv.Atoi(strings.TrimSpace(v)); err == nil && perr == nil && k > sessions {
			sessions, grew = k, time.Now()
		}
		select {
		case err := <-exited:
			return "", fmt.Errorf("tsung ended before its users logged in (%d of %d): %v; see %s.log", sessions, users, err, logDir)
		case <-time.After(500 * time.Millisecond):
		}
	}
	time.Sleep(idle)
	loaded, err := measure(ctx, nd.ej, sc.pid())
	if err != nil {
		stopTsung()
		return "", err
	}
	v, _ := nd.ej.Eval(ctx, "length(ejabberd_sm:dirty_get_sessions_list())")
	seen, _ := strconv.Atoi(strings.TrimSpace(v))
	if seen < 1 {
		seen = 1
	}
	status := tsungStats(logDir)
	select {
	case err := <-exited:
		if err != nil {
			status += "; exit: " + err.Error()
		}
		status = tsungStats(logDir)
	case <-time.After(3 * time.Minute):
		stopTsung()
		status += "; killed after 3 min"
	}
	if err := settle(ctx, nd); err != nil {
		return "", err
	}
	per := func(a, b int64) float64 { return float64(b-a) / float64(seen) / 1024 }
	r := idleResult{beamRSS: per(base.beamRSS, loaded.beamRSS), sidecarRSS: per(base.sidecarRSS, loaded.sidecarRSS),
		kernel: per(base.kernel, loaded.kernel) / 2}
	return fmt.Sprintf("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | **%.1f** | %.2f | %s |", filepath.Base(file), seen, r.beamRSS,
		per(base.erlangGC, loaded.erlangTotal), per(base.erlangGC, loaded.erlangGC), r.sidecarRSS, r.kernel, r.total(),
		float64(loaded.processes-base.processes)/float64(seen), status), nil
}

// tsungStats sums up Tsung's own log (tsung.log, its last dump): logins
// done and their mean time, and every error counter.
func tsungStats(logDir string) string {
	files, _ := filepath.Glob(filepath.Join(logDir, "*", "tsung.log"))
	if len(files) == 0 {
		return "no tsung.log"
	}
	b, err := os.ReadFile(files[len(files)-1])
	if err != nil {
		return err.Error()
	}
	last := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "stats:" {
			last[f[1]] = f[2:]
		}
	}
	out := "no login done"
	// A sample line: count, mean, stddev, max, min (this interval), then
	// the mean and count of the whole run.
	if f := last["tr_login"]; len(f) >= 7 {
		mean, _ := strconv.ParseFloat(f[5], 64)
		out = fmt.Sprintf("%s logins, mean %.0f ms", f[6], mean)
	}
	var names []string
	for name := range last {
		if strings.HasPrefix(name, "error_") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		out += fmt.Sprintf(", %s %s", strings.TrimPrefix(name, "error_"), last[name][len(last[name])-1])
	}
	return out
}
