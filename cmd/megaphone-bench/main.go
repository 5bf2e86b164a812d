// Command megaphone-bench measures Megaphone side by side with ejabberd's
// own listeners, per transport (plain TCP c2s, direct-TLS c2s, WebSocket,
// BOSH relayed to ejabberd_bosh and BOSH kept by the sidecar at the edge,
// both against mod_bosh), on the same private ejabberd node in the same run:
//
//   - idle sessions at several N: memory per session (sidecar RSS, beam RSS,
//     erlang:memory(total), kernel sockets), Erlang processes and ports per
//     session, and the login rate;
//   - 1:1 chat between pairs at a fixed client count: messages/s with one
//     message in flight per pair, and end-to-end latency, saturated and at a
//     paced rate.
//
// It writes a Markdown report and PNG plots (gnuplot).
//
//	megaphone-bench -n 1000,5000 -out bench.out.md -plots bench
//
// `megaphone-bench -tsung` instead serves both paths on fixed ports for the
// Tsung scenarios in bench/tsung and runs them (make bench-tsung).
//
// Everything stays on loopback; every loop is bounded by a count and every
// wait by a deadline.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
)

// config is the whole run's settings.
type config struct {
	bin, ebin   string // sidecar binary, shim ebin
	ns          []int
	kinds       []transport
	workers     int
	pairs       int
	chatFor     time.Duration
	pacedRate   float64 // messages per second per pair in the paced phase
	idle        time.Duration
	sweep       time.Duration  // the shim's gc_sweep_interval
	shimEnv     map[string]int // more of the shim's application environment
	dialer      *loadgen.Dialer
	cert, key   string
	out, plots  string
	tsungDir    string
	tsungUsers  int
	tsungScript string
	alloc       bool // report where beam's memory sits, per allocator
}

// transport is what one column of the benchmark measures: the clients'
// transport and, for BOSH, how the sidecar serves it. The native side of
// both BOSH columns is ejabberd's mod_bosh.
type transport string

const (
	transportTCP       transport = "tcp"
	transportTLS       transport = "tls"
	transportWebSocket transport = "ws"
	transportBOSH      transport = "bosh"      // the sidecar relays to ejabberd_bosh (--bosh-mode relay)
	transportBOSHEdge  transport = "bosh-edge" // the sidecar keeps the sessions (--bosh-mode edge)
)

// transports is every transport, in the report's order.
var transports = []transport{transportTCP, transportTLS, transportWebSocket, transportBOSH, transportBOSHEdge}

// client is the load generator's transport.
func (t transport) client() loadgen.Kind {
	if t == transportBOSHEdge {
		return loadgen.BOSH
	}
	return loadgen.Kind(t)
}

// boshMode is the sidecar's --bosh-mode; "" for the stream transports.
func (t transport) boshMode() string {
	switch t {
	case transportBOSH:
		return "relay"
	case transportBOSHEdge:
		return "edge"
	}
	return ""
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == scaleWorkerCommand {
		os.Exit(scaleWorkerMain(os.Args[2:]))
	}
	var c config
	scale, scaleSettings := scaleFlags()
	ns := flag.String("n", "1000,5000", "idle sessions per side, comma-separated (each at most about 19000: the open-files limit)")
	kinds := flag.String("transports", "tcp,tls,ws,bosh,bosh-edge", "transports to measure: tcp, tls, ws, bosh (the sidecar in --bosh-mode relay), bosh-edge (--bosh-mode edge)")
	flag.IntVar(&c.workers, "workers", 50, "concurrent logins")
	sources := flag.Int("sources", 8, "loopback source addresses for the clients (127.0.0.2 and up)")
	flag.IntVar(&c.pairs, "pairs", 200, "chatting pairs (0: no chat)")
	flag.DurationVar(&c.chatFor, "chat-for", 5*time.Second, "length of each chat phase")
	flag.Float64Var(&c.pacedRate, "paced-rate", 5, "messages per second per pair in the paced chat phase")
	flag.DurationVar(&c.sweep, "sweep", defaultSweep, "the shim's idle-c2s sweep interval (gc_sweep_interval; the shim's own default is 60s)")
	flag.DurationVar(&c.idle, "idle", minIdle(defaultSweep), "how long sessions idle before they are measured (at least three sweeps and a second)")
	flag.StringVar(&c.out, "out", "", "also write the Markdown report to this file")
	flag.StringVar(&c.plots, "plots", "", "write PNG plots (and their data) into this directory")
	flag.BoolVar(&c.alloc, "alloc", false, "also report beam's allocators (carriers, blocks, carrier fill) per session")
	shimEnv := flag.String("shim-env", "", "more of the shim's settings for the run, as key=integer,... (e.g. login_gc_interval=0)")
	boshMode := flag.String("bosh-mode", "relay", "what the bosh transport runs: relay, or edge (then it is bosh-edge); kept for older command lines, -transports bosh-edge says it")
	tsung := flag.Bool("tsung", false, "serve both paths on fixed ports and run the Tsung scenarios instead")
	flag.StringVar(&c.tsungDir, "tsung-dir", "bench/tsung", "Tsung scenario directory")
	flag.IntVar(&c.tsungUsers, "tsung-users", 2000, "users registered for Tsung (tsung1..tsungN, passwords pw1..pwN)")
	flag.Parse()

	c.bin, c.ebin = os.Getenv("MEGAPHONE_BIN"), os.Getenv("MEGAPHONE_SHIM_EBIN")
	c.dialer = loadgen.NewDialer(*sources)
	c.idle = max(c.idle, minIdle(c.sweep))
	var err error
	if err = scaleSettings(); err == nil && !scale.on {
		c.ns, err = parseInts(*ns)
	}
	if err == nil {
		c.kinds, err = parseKinds(*kinds, *boshMode)
	}
	if err == nil {
		c.shimEnv, err = parseShimEnv(*shimEnv)
	}
	if err == nil && (c.bin == "" || c.ebin == "") {
		err = fmt.Errorf("set MEGAPHONE_BIN and MEGAPHONE_SHIM_EBIN (make bench does)")
	}
	if err == nil {
		raiseOpenFiles()
		switch {
		case scale.on:
			err = runScale(context.Background(), c, scale)
		case *tsung:
			err = runTsung(context.Background(), c)
		default:
			err = run(context.Background(), c)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "megaphone-bench:", err)
		os.Exit(1)
	}
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 19000 {
			return nil, fmt.Errorf("bad session count %q (1..19000)", f)
		}
		out = append(out, n)
	}
	sort.Ints(out)
	return out, nil
}

// parseShimEnv reads key=integer pairs for the shim's application
// environment; keys are plain lowercase names, so they are safe to put in
// an Erlang expression.
func parseShimEnv(s string) (map[string]int, error) {
	env := map[string]int{}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		k, v, ok := strings.Cut(f, "=")
		n, err := strconv.Atoi(v)
		if !ok || err != nil || k == "" || strings.Trim(k, "abcdefghijklmnopqrstuvwxyz_") != "" {
			return nil, fmt.Errorf("bad shim setting %q (want name=integer)", f)
		}
		env[k] = n
	}
	return env, nil
}

// parseKinds reads -transports. boshMode is -bosh-mode: edge makes bosh
// bosh-edge, as the flag did before bosh-edge was a transport of its own.
func parseKinds(s, boshMode string) ([]transport, error) {
	if boshMode != "relay" && boshMode != "edge" {
		return nil, fmt.Errorf("bad -bosh-mode %q (relay, edge)", boshMode)
	}
	var out []transport
	for _, f := range strings.Split(s, ",") {
		k := transport(strings.TrimSpace(f))
		if !slices.Contains(transports, k) {
			return nil, fmt.Errorf("unknown transport %q (tcp, tls, ws, bosh, bosh-edge)", f)
		}
		if k == transportBOSH && boshMode == "edge" {
			k = transportBOSHEdge
		}
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out, nil
}

// raiseOpenFiles lifts the soft open-files limit to the hard one: the
// clients, the sidecar and the node (children inherit it) each hold one
// descriptor per session.
func raiseOpenFiles() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

func run(ctx context.Context, c config) error {
	cleanup, err := withCert(&c, "megaphone-bench-")
	if err != nil {
		return err
	}
	defer cleanup()
	started := time.Now()
	var idle []idleResult
	var chats []chatResult
	var failures []string
	natives := nativeRuns{}
	nodes := &nodeQueue{c: c, users: plannedUsers(c)}
	defer nodes.close()
	for _, kind := range c.kinds {
		for i, n := range c.ns {
			chat := i == 0 && c.pairs > 0
			rs, cs, err := runCell(ctx, c, nodes, natives, kind, n, chat)
			if err != nil {
				// The other cells still run; the report names the failure.
				failures = append(failures, fmt.Sprintf("%s, %d sessions: %v", kind, n, err))
				fmt.Fprintln(os.Stderr, "megaphone-bench:", failures[len(failures)-1])
				continue
			}
			idle = append(idle, rs...)
			chats = append(chats, cs...)
		}
	}
	report := renderReport(c, idle, chats, failures, time.Since(started))
	if err := publish(c, report); err != nil {
		return err
	}
	if c.plots != "" {
		if err := plot(c.plots, idle, chats); err != nil {
			return fmt.Errorf("plots: %w", err)
		}
	}
	if len(failures) > 0 {
		return fmt.Errorf("%d measurement(s) failed", len(failures))
	}
	return nil
}

// nativeSide is one measurement of ejabberd's own listener.
type nativeSide struct {
	idle idleResult
	chat chatResult
}

// nativeKey is what a native measurement depends on: the clients'
// transport, N and whether chat ran. The sidecar's BOSH mode is not in it.
type nativeKey struct {
	client loadgen.Kind
	n      int
	chat   bool
}

// nativeRuns keeps each native measurement for the run. The bosh and
// bosh-edge columns differ only in the sidecar; natively both are mod_bosh
// under the same load, so the second column reuses the first one's native
// rows instead of measuring them again (about 1.6 minutes of make bench).
type nativeRuns map[nativeKey]nativeSide

// runCell measures one transport at one N: through the sidecar, then
// natively, each on a fresh node of the same configuration. Sharing one
// node would skew beam RSS: the allocators keep the carriers the first
// side's logins grew, and the second side grows into them unseen.
func runCell(ctx context.Context, c config, nodes *nodeQueue, natives nativeRuns, kind transport, n int, chat bool) ([]idleResult, []chatResult, error) {
	var idle []idleResult
	var chats []chatResult
	key := nativeKey{kind.client(), n, chat}
	for _, megaphone := range []bool{true, false} {
		var r idleResult
		var cr chatResult
		var err error
		if side, measured := natives[key]; !megaphone && measured {
			r, cr = side.idle, side.chat
			r.kind, cr.kind = kind, kind
		} else if r, cr, err = runSide(ctx, c, nodes, kind, n, chat, megaphone); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", pathName(megaphone), err)
		} else if !megaphone {
			natives[key] = nativeSide{r, cr}
		}
		idle = append(idle, r)
		if chat {
			chats = append(chats, cr)
		}
		fmt.Fprintf(os.Stderr, "%s %s n=%d: total %.1f KiB/session, %.0f logins/s\n", kind, pathName(megaphone), n, r.total(), r.loginRate)
	}
	return idle, chats, nil
}

func runSide(ctx context.Context, c config, nodes *nodeQueue, kind transport, n int, chat, megaphone bool) (idleResult, chatResult, error) {
	r, cr := idleResult{kind: kind, megaphone: megaphone}, chatResult{kind: kind, megaphone: megaphone}
	nd, err := nodes.take(ctx, sideUsers(c, n, chat))
	if err != nil {
		return r, cr, err
	}
	defer nd.ej.Stop()
	var sc *sidecar
	target := nd.nativeTarget(kind.client())
	if megaphone {
		if sc, err = startSidecar(ctx, c, nd, kind); err != nil {
			return r, cr, err
		}
		defer sc.stop()
		target = sc.target
	}
	if r, err = idlePhase(ctx, c, nd, sc, kind, target, n, func() { nodes.startNext(ctx) }); err != nil {
		return r, cr, err
	}
	r.kind, r.megaphone = kind, megaphone
	if chat {
		// The chat starts from where the idle phase started; without a
		// chat the node is stopped next, so there is nothing to wait for.
		if err := settle(ctx, nd); err != nil {
			return r, cr, err
		}
		nodes.waitNext()
		pid := 0
		if sc != nil {
			pid = sc.pid()
		}
		cr, err = chatPhase(ctx, c, nd, pid, kind, target)
		cr.kind, cr.megaphone = kind, megaphone
	}
	return r, cr, err
}

func pathName(megaphone bool) string {
	if megaphone {
		return "Megaphone"
	}
	return "native"
}

func machine() string {
	host, _ := os.Hostname()
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := float64(meminfo("MemTotal")) / (1 << 30)
	return fmt.Sprintf("%s: %d CPUs (%s), %.0f GiB RAM, %s/%s, %s", host, runtime.NumCPU(), cpu, mem,
		runtime.GOOS, runtime.GOARCH, runtime.Version())
}

func meminfo(key string) int64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == key+":" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	return 0
}
