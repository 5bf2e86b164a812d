// Command megaphone-bench measures what an idle XMPP session costs, side by
// side: N sessions logged in to ejabberd's own c2s listener, then N logged
// in through the Megaphone sidecar (c2s in element mode), on the same
// private ejabberd node, in the same run. It prints a Markdown report.
//
//	megaphone-bench -n 2000
//
// It is what `make bench` runs. Everything stays on loopback; every loop is
// bounded by the session count and by deadlines.
package main

import (
	"context"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

const (
	sweepMs = 2000
	idle    = 3*sweepMs*time.Millisecond + time.Second // two sweeps see a c2s idle
)

func main() {
	n := flag.Int("n", 2000, "idle sessions per side")
	workers := flag.Int("workers", 50, "concurrent logins")
	out := flag.String("out", "", "also write the report to this file")
	flag.Parse()
	if err := run(*n, *workers, *out); err != nil {
		fmt.Fprintln(os.Stderr, "megaphone-bench:", err)
		os.Exit(1)
	}
}

// sample is one measurement of the ejabberd node (and the sidecar).
type sample struct {
	beamRSS, erlangTotal, erlangGC, sidecarRSS, kernelTCP int64 // bytes
	processes                                             int
}

func run(n, workers int, out string) error {
	bin := os.Getenv("MEGAPHONE_BIN")
	if bin == "" {
		return fmt.Errorf("set MEGAPHONE_BIN (make bench does)")
	}
	ebin := os.Getenv("MEGAPHONE_SHIM_EBIN")
	ctx := context.Background()
	ej, err := harness.Start(ctx, harness.Options{Name: "bench", StartTimeout: time.Minute})
	if err != nil {
		return err
	}
	defer ej.Stop()
	if out, err := ej.LoadShim(ctx, ebin); err != nil {
		return fmt.Errorf("shim: %v\n%s", err, out)
	}
	// The shim sweeps idle c2s processes every minute by default; a short
	// interval lets the idle wait below see its effect.
	if _, err := ej.Eval(ctx, fmt.Sprintf("application:set_env(megaphone, gc_sweep_interval, %d)", sweepMs)); err != nil {
		return err
	}
	// One rpc loop registers everyone.
	if _, err := ej.Eval(ctx, fmt.Sprintf(`[ejabberd_auth:try_register(<<"b", (integer_to_binary(I))/binary>>,
	    <<"localhost">>, <<"pw">>) || I <- lists:seq(1, %d)], ok`, n)); err != nil {
		return err
	}
	port, err := harness.FreePort()
	if err != nil {
		return err
	}
	c2s := fmt.Sprintf("127.0.0.1:%d", port)
	sidecar := exec.Command(bin, "--node", ej.Node, "--cookie-file", ej.CookieFile, "--bosh-addr", "127.0.0.1:0",
		"--c2s-addr", c2s, "--log-level", "warn")
	sidecar.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := sidecar.Start(); err != nil {
		return err
	}
	defer func() { _ = sidecar.Process.Kill(); _ = sidecar.Wait() }()
	if err := waitDial(c2s); err != nil {
		return err
	}
	time.Sleep(2 * time.Second) // attach

	native := fmt.Sprintf("127.0.0.1:%d", ej.C2SPort)
	initial, err := measure(ctx, ej, sidecar.Process.Pid)
	if err != nil {
		return err
	}
	var rows []string
	for _, side := range []struct{ name, addr string }{{"ejabberd c2s (native)", native}, {"Megaphone (element mode)", c2s}} {
		base, err := measure(ctx, ej, sidecar.Process.Pid)
		if err != nil {
			return err
		}
		conns, took, err := loginAll(side.addr, n, workers)
		if err != nil {
			return fmt.Errorf("%s: %w", side.name, err)
		}
		time.Sleep(idle)
		loaded, err := measure(ctx, ej, sidecar.Process.Pid)
		if err != nil {
			return err
		}
		per := func(a, b int64) string { return fmt.Sprintf("%.1f", float64(b-a)/float64(n)/1024) }
		rows = append(rows, fmt.Sprintf("| %s | %d | %.0f | %s | %s | %s | %s | %s | %.2f |", side.name, n,
			float64(n)/took.Seconds(), per(base.beamRSS, loaded.beamRSS), per(base.erlangGC, loaded.erlangTotal),
			per(base.erlangGC, loaded.erlangGC), per(base.sidecarRSS, loaded.sidecarRSS),
			per(base.kernelTCP, loaded.kernelTCP), float64(loaded.processes-base.processes)/float64(n)))
		for _, c := range conns {
			c.Close()
		}
		if err := waitSessions(ctx, ej, 0); err != nil {
			return err
		}
		// The next side starts only once this side's processes are gone.
		if err := waitProcesses(ctx, ej, initial.processes+20); err != nil {
			return err
		}
	}
	report := fmt.Sprintf(`## Idle XMPP sessions, %d per side (%s)

Same private ejabberd node (%s), same run; plain TCP on both sides, SASL
PLAIN, bound resource, initial presence, then %s idle (the shim's idle-c2s
sweep runs every %d ms here). Per-session figures are the growth over the
idle baseline divided by the session count.

| path | sessions | logins/s | beam RSS KiB | Erlang memory KiB | Erlang memory after GC KiB | sidecar RSS KiB | kernel TCP KiB | Erlang processes |
|---|---|---|---|---|---|---|---|---|
%s

Measured on %s, %d CPUs. "Erlang memory" is erlang:memory(total) as the
sessions sit; "after GC" is the same after garbage-collecting every process
twice (idle native c2s processes never collect on their own; the shim sweeps
the ones it started).
`, n, time.Now().UTC().Format("2006-01-02"), ej.Node, idle, sweepMs, strings.Join(rows, "\n"), runtime.GOOS+"/"+runtime.GOARCH, runtime.NumCPU())
	fmt.Print(report)
	if out != "" {
		return os.WriteFile(out, []byte(report), 0o644)
	}
	return nil
}

func waitDial(addr string) error {
	for i := 0; i < 100; i++ {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s does not accept connections", addr)
}

func measure(ctx context.Context, ej *harness.Ejabberd, sidecarPid int) (sample, error) {
	var s sample
	v, err := ej.Eval(ctx, `{erlang:memory(total), erlang:system_info(process_count),
	    begin [erlang:garbage_collect(P) || P <- processes()], [erlang:garbage_collect(P) || P <- processes()],
	    erlang:memory(total) end}`)
	if err != nil {
		return s, err
	}
	f := strings.FieldsFunc(v, func(r rune) bool { return r == '{' || r == '}' || r == ',' || r == ' ' || r == '\n' })
	if len(f) != 3 {
		return s, fmt.Errorf("unexpected %q", v)
	}
	s.erlangTotal, _ = strconv.ParseInt(f[0], 10, 64)
	p, _ := strconv.Atoi(f[1])
	s.processes = p
	s.erlangGC, _ = strconv.ParseInt(f[2], 10, 64)
	s.beamRSS = rss(ej.Pid)
	s.sidecarRSS = rss(sidecarPid)
	s.kernelTCP = kernelTCP()
	return s, nil
}

func rss(pid int) int64 {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// kernelTCP is the kernel's TCP buffer memory (/proc/net/sockstat, pages).
func kernelTCP() int64 {
	b, _ := os.ReadFile("/proc/net/sockstat")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[0] == "TCP:" && f[i] == "mem" {
				pages, _ := strconv.ParseInt(f[i+1], 10, 64)
				return pages * int64(os.Getpagesize())
			}
		}
	}
	return 0
}

func waitSessions(ctx context.Context, ej *harness.Ejabberd, want int) error {
	for i := 0; i < 120; i++ {
		v, err := ej.Eval(ctx, "length(ejabberd_sm:dirty_get_sessions_list())")
		if err == nil && strings.TrimSpace(v) == strconv.Itoa(want) {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("sessions did not drop to %d", want)
}

func waitProcesses(ctx context.Context, ej *harness.Ejabberd, atMost int) error {
	for i := 0; i < 120; i++ {
		v, err := ej.Eval(ctx, "erlang:system_info(process_count)")
		if n, perr := strconv.Atoi(strings.TrimSpace(v)); err == nil && perr == nil && n <= atMost {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("processes did not drop to %d", atMost)
}

// loginAll logs users b1..bN in over plain XMPP and keeps them connected.
func loginAll(addr string, n, workers int) ([]net.Conn, time.Duration, error) {
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > n {
					return
				}
				c, err := login(addr, "b"+strconv.Itoa(i))
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				conns[i-1] = c
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if firstErr != nil {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		return nil, 0, firstErr
	}
	return conns, took, nil
}

func login(addr, user string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	header := `<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00pw"))
	steps := []struct{ send, until string }{
		{header, "</stream:features>"},
		{"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + plain + "</auth>", "<success"},
		{header, "</stream:features>"},
		{"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>", "</iq>"},
		{"<presence/>", "<presence"},
	}
	buf := make([]byte, 4096)
	for _, st := range steps {
		if _, err := io.WriteString(c, st.send); err != nil {
			c.Close()
			return nil, err
		}
		var seen strings.Builder
		for !strings.Contains(seen.String(), st.until) {
			k, err := c.Read(buf)
			if err != nil {
				c.Close()
				return nil, fmt.Errorf("%s: waiting for %s: %w (got %q)", user, st.until, err, seen.String())
			}
			seen.Write(buf[:k])
		}
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}
