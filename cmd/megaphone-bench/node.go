package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
	"github.com/megaphone-im/megaphone/test/harness"
)

// defaultSweep is the shim's idle-c2s sweep interval for the run (60 s by
// default in the shim): short, so that the idle wait sees its effect.
const defaultSweep = 2 * time.Second

// node is one private ejabberd with the shim loaded, a direct-TLS c2s
// listener beside the harness's plain one, and users b1..bN (password pw).
type node struct {
	ej       *harness.Ejabberd
	tlsPort  int
	baseline int // Erlang processes with no session
}

// boshInactivity ends BOSH sessions soon after their client hangs up, so
// that a side's sessions are gone soon after its run: mod_bosh's
// max_inactivity, and the edge sidecar's --bosh-inactivity, so that both
// paths run with the same. Not for Tsung, whose BOSH client leaves gaps
// between requests longer than that. A session that chats never goes that
// long without a request held: loadgen's client polls as soon as an answer
// leaves none (and, ejabberd_bosh's inactivity timer starting with each
// answer, it must within this).
const boshInactivity = 5 * time.Second

// startNode starts a node with users b1..b<users>. opts may fix ejabberd's
// own listeners' ports and mod_bosh's inactivity timeout.
func startNode(ctx context.Context, c config, users int, opts harness.Options) (*node, error) {
	tlsPort, err := harness.FreePort()
	if err != nil {
		return nil, err
	}
	extra := fmt.Sprintf(`certfiles:
  - %q
  - %q
listen:
  -
    port: %d
    ip: "127.0.0.1"
    module: ejabberd_c2s
    backlog: 1024
    tls: true
    max_stanza_size: 262144
    shaper: c2s_shaper
    access: c2s
`, c.cert, c.key, tlsPort)
	opts.Name, opts.StartTimeout, opts.ExtraConfig = "bench", time.Minute, extra
	ej, err := harness.Start(ctx, opts)
	if err != nil {
		return nil, err
	}
	nd := &node{ej: ej, tlsPort: tlsPort}
	if err := nd.prepare(ctx, c, users); err != nil {
		ej.Stop()
		return nil, err
	}
	return nd, nil
}

func (nd *node) prepare(ctx context.Context, c config, users int) error {
	if err := waitDial(fmt.Sprintf("127.0.0.1:%d", nd.tlsPort)); err != nil {
		return err
	}
	if out, err := nd.ej.LoadShim(ctx, c.ebin); err != nil {
		return fmt.Errorf("shim: %v\n%s", err, out)
	}
	if _, err := nd.ej.Eval(ctx, fmt.Sprintf("application:set_env(megaphone, gc_sweep_interval, %d)", c.sweep.Milliseconds())); err != nil {
		return err
	}
	for k, v := range c.shimEnv {
		if _, err := nd.ej.Eval(ctx, fmt.Sprintf("application:set_env(megaphone, %s, %d)", k, v)); err != nil {
			return err
		}
	}
	if err := registerUsers(ctx, nd.ej, "b", "pw", users, false); err != nil {
		return err
	}
	v, err := nd.ej.Eval(ctx, "erlang:system_info(process_count)")
	if err != nil {
		return err
	}
	nd.baseline, _ = strconv.Atoi(strings.TrimSpace(v))
	return nil
}

// registerUsers registers prefix1..prefixN in one loop on the node (one
// Eval, not one ejabberdctl per user). With numbered, the password of
// prefixI is passwordI, as Tsung expects.
func registerUsers(ctx context.Context, ej *harness.Ejabberd, prefix, password string, n int, numbered bool) error {
	pw := fmt.Sprintf("<<%q>>", password)
	if numbered {
		pw = fmt.Sprintf("<<%q, (integer_to_binary(I))/binary>>", password)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	v, err := ej.Eval(ctx, fmt.Sprintf(`length([ok || I <- lists:seq(1, %d),
	    ejabberd_auth:try_register(<<%q, (integer_to_binary(I))/binary>>, <<"localhost">>, %s) =/= {error, not_allowed}])`,
		n, prefix, pw))
	if err != nil {
		return err
	}
	if strings.TrimSpace(v) != strconv.Itoa(n) {
		return fmt.Errorf("registered %s of %d users", v, n)
	}
	return nil
}

func (nd *node) nativeTarget(kind loadgen.Kind) loadgen.Target {
	t := loadgen.Target{Kind: kind, Domain: "localhost", Addr: fmt.Sprintf("127.0.0.1:%d", nd.ej.C2SPort)}
	switch kind {
	case loadgen.TLS:
		t.Addr = fmt.Sprintf("127.0.0.1:%d", nd.tlsPort)
	case loadgen.WebSocket:
		t.Addr, t.Path = fmt.Sprintf("127.0.0.1:%d", nd.ej.HTTPPort), "/ws"
	case loadgen.BOSH:
		t.Addr, t.Path = fmt.Sprintf("127.0.0.1:%d", nd.ej.HTTPPort), "/bosh"
	}
	return t
}

// sidecar is one Megaphone process serving one transport.
type sidecar struct {
	cmd    *exec.Cmd
	target loadgen.Target
}

func startSidecar(ctx context.Context, c config, nd *node, kind transport) (*sidecar, error) {
	port, err := harness.FreePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := nd.sidecarArgs()
	t := loadgen.Target{Kind: kind.client(), Addr: addr, Domain: "localhost"}
	switch kind {
	case transportTCP:
		args = append(args, "--c2s-addr", addr, "--bosh-addr", "127.0.0.1:0")
	case transportTLS:
		args = append(args, "--c2s-tls-addr", addr, "--tls-cert", c.cert, "--tls-key", c.key, "--bosh-addr", "127.0.0.1:0")
	case transportWebSocket:
		args = append(args, "--bosh-addr", addr, "--ws-path", "/ws")
		t.Path = "/ws"
	case transportBOSH, transportBOSHEdge:
		args = append(args, "--bosh-addr", addr, "--bosh-mode", kind.boshMode(), "--bosh-inactivity", boshInactivity.String())
		t.Path = "/bosh"
	}
	return launchSidecar(ctx, c, nd, args, t)
}

// sidecarArgs attaches a sidecar to the node, quietly and without its admin
// endpoint (whose fixed default port another sidecar on the box may hold).
func (nd *node) sidecarArgs(listeners ...string) []string {
	return append([]string{"--node", nd.ej.Node, "--cookie-file", nd.ej.CookieFile, "--log-level", "warn", "--admin-addr", ""}, listeners...)
}

func launchSidecar(ctx context.Context, c config, nd *node, args []string, t loadgen.Target) (*sidecar, error) {
	cmd := exec.Command(c.bin, args...)
	cmd.Stderr = os.Stderr
	// Its own process group: a Ctrl-C stops the run, which then stops the
	// sidecar itself; the sidecar does not drain on its own first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	sc := &sidecar{cmd: cmd, target: t}
	if err := waitDial(t.Addr); err != nil {
		sc.stop()
		return nil, err
	}
	// Attached once the node lists it as a hidden node and its hello had
	// a moment to land.
	want := fmt.Sprintf("megaphone_%d@", cmd.Process.Pid)
	for i := 0; ; i++ {
		v, err := nd.ej.Eval(ctx, "[atom_to_list(N) || N <- nodes(hidden)]")
		if err == nil && strings.Contains(v, want) {
			break
		}
		if i == 50 {
			sc.stop()
			return nil, fmt.Errorf("sidecar %s did not attach (%v %s)", want, err, v)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	return sc, nil
}

func (sc *sidecar) pid() int { return sc.cmd.Process.Pid }

// stop ends the sidecar this run started (by its own PID).
func (sc *sidecar) stop() {
	_ = sc.cmd.Process.Signal(syscall.SIGTERM)
	waitOrKill(sc.cmd, 15*time.Second)
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

// sample is one measurement of the node, the sidecar and the kernel.
type sample struct {
	beamRSS, erlangTotal, erlangGC, sidecarRSS int64 // bytes
	kernel                                     int64 // socket buffers and socket slabs, bytes
	processes, ports                           int
}

// measureExpr samples the node in one probe (each probe is an Erlang node
// to start, a second or more on a busy box): memory, processes and ports
// as the sessions sit, memory after a forced GC of every process, and
// then, once mseg_alloc has unmapped what that GC emptied (segmentCache),
// how many segments were still cached when the wait gave up.
const measureExpr = `
Total = erlang:memory(total), Procs = erlang:system_info(process_count), Ports = erlang:system_info(port_count),
[erlang:garbage_collect(P) || P <- processes()], [erlang:garbage_collect(P) || P <- processes()],
AfterGC = erlang:memory(total),
` + segmentCacheWait + `,
{Total, Procs, Ports, AfterGC, SegmentsLeft}`

func measure(ctx context.Context, ej *harness.Ejabberd, sidecarPid int) (sample, error) {
	var s sample
	// The wait for mseg_alloc is up to 30 s, and the probe node itself can
	// take many seconds to start on a busy box.
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	v, err := ej.Eval(ctx, measureExpr)
	if err != nil {
		return s, err
	}
	f := strings.FieldsFunc(v, func(r rune) bool { return r == '{' || r == '}' || r == ',' || r == ' ' || r == '\n' })
	if len(f) != 5 {
		return s, fmt.Errorf("unexpected %q", v)
	}
	s.erlangTotal, _ = strconv.ParseInt(f[0], 10, 64)
	s.processes, _ = strconv.Atoi(f[1])
	s.ports, _ = strconv.Atoi(f[2])
	s.erlangGC, _ = strconv.ParseInt(f[3], 10, 64)
	if f[4] != "0" {
		fmt.Fprintf(os.Stderr, "megaphone-bench: %s segments still in mseg_alloc's cache after 30 s\n", f[4])
	}
	s.beamRSS = rss(ej.Pid)
	if sidecarPid > 0 {
		s.sidecarRSS = rss(sidecarPid)
	}
	s.kernel = kernelTCPBuffers() + kernelSocketSlabs()
	return s, nil
}

// segmentCacheWait waits (at most 30 s) until mseg_alloc has given every
// segment in its cache back to the OS, and binds SegmentsLeft to how many
// are left. Carriers a collection empties wait in that cache (up to 10 per
// scheduler, 1-8 MiB each), which gives one back about every second: read
// at once after the forced GC, beam's RSS counted them, up to 16 KiB per
// session at N=5000 (BENCH.md, 2026-12-02), memory the node returns
// within seconds on its own.
const segmentCacheWait = `
Cached = fun() -> lists:sum([proplists:get_value(cached_segments, proplists:get_value(status, M, []), 0)
                             || {instance, _, I} <- erlang:system_info({allocator, mseg_alloc}),
                                {memkind, M} <- I]) end,
Wait = fun W(0) -> Cached(); W(K) -> case Cached() of 0 -> 0; _ -> timer:sleep(250), W(K - 1) end end,
SegmentsLeft = Wait(120)`

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

// kernelTCPBuffers is the kernel's TCP buffer memory (/proc/net/sockstat,
// pages): what sockets have queued. Idle sockets queue next to nothing.
func kernelTCPBuffers() int64 {
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

// kernelSocketSlabs is what the kernel's socket structures take
// (/proc/slabinfo: the TCP sock and its inode, active objects times object
// size): the part of a socket's cost sockstat does not show. Machine-wide,
// so other work on the box adds noise.
func kernelSocketSlabs() int64 {
	b, _ := os.ReadFile("/proc/slabinfo")
	var total int64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && (f[0] == "TCP" || f[0] == "sock_inode_cache") {
			objs, _ := strconv.ParseInt(f[1], 10, 64)
			size, _ := strconv.ParseInt(f[3], 10, 64)
			total += objs * size
		}
	}
	return total
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
