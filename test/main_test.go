// Package test holds Megaphone's integration tests: a real ejabberd node
// started on loopback by test/harness, the shim loaded into it from an erl
// remote shell as an operator would, the real sidecar binary, and real
// clients from npm (test/clients).
package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

const demoPassword = "demo"

var (
	repoRoot   string // the repository
	sidecarBin string // the megaphone binary under test
	shimEbin   string // the shim's ebin directory on the host (rebar3's build)
	clientsDir string // test/clients, with node_modules installed

	// targets are the ejabberd installations every test runs on: the
	// host's and, once scripts/trixie-chroot.sh has built it, Debian 13's.
	targets []target
	// hostTarget is targets[0], this machine's own ejabberd.
	hostTarget target
)

// target is one ejabberd/OTP installation with the shim built for it.
type target struct {
	harness.Target
	shimEbin string // the shim's ebin directory as the target's node sees it
}

func TestMain(m *testing.M) {
	if err := locateParts(); err != nil {
		fmt.Fprintln(os.Stderr, "integration tests:", err)
		os.Exit(1)
	}
	cleanup, err := prepareTargets()
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration tests:", err)
		os.Exit(1)
	}
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// prepareTargets lists the targets (a missing Debian 13 chroot is an error
// when MEGAPHONE_REQUIRE_TRIXIE=1) and compiles the shim for each one that
// is not the host with that target's own erlc. The host uses rebar3's
// build, the one the README tells operators to load.
func prepareTargets() (cleanup func(), err error) {
	ts, err := harness.Targets()
	if err != nil {
		return nil, err
	}
	var cleanups []func()
	cleanup = func() {
		for _, c := range cleanups {
			c()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, t := range ts {
		tg := target{Target: t, shimEbin: shimEbin}
		if t.Root != "" {
			ebin, done, err := t.BuildShim(ctx, filepath.Join(repoRoot, "erlang", "src"))
			if err != nil {
				cleanup()
				return nil, err
			}
			cleanups = append(cleanups, done)
			tg.shimEbin = ebin
		}
		fmt.Fprintf(os.Stderr, "integration tests: target %s: %s, shim %s\n", tg.Name, tg.Desc, tg.shimEbin)
		targets = append(targets, tg)
	}
	hostTarget = targets[0]
	return cleanup, nil
}

// forEachTarget runs f as one subtest per target, named after it
// (TestX/debian12, TestX/debian13).
func forEachTarget(t *testing.T, f func(t *testing.T, tg target)) {
	t.Helper()
	for _, tg := range targets {
		t.Run(tg.Name, func(t *testing.T) {
			t.Logf("target: %s", tg.Desc)
			f(t, tg)
		})
	}
}

// locateParts finds (or builds) the sidecar and the shim. make passes them
// in; a bare `go test ./test/...` builds them itself.
func locateParts() error {
	root, err := filepath.Abs("..")
	if err != nil {
		return err
	}
	repoRoot = root
	clientsDir = filepath.Join(root, "test", "clients")
	if _, err := os.Stat(filepath.Join(clientsDir, "node_modules", "strophe.js")); err != nil {
		return fmt.Errorf("npm clients not installed in %s: run make deps", clientsDir)
	}
	sidecarBin = os.Getenv("MEGAPHONE_BIN")
	if sidecarBin == "" {
		sidecarBin = filepath.Join(os.TempDir(), fmt.Sprintf("megaphone-test-%d", os.Getpid()))
		cmd := exec.Command("go", "build", "-o", sidecarBin, "./cmd/megaphone")
		cmd.Dir, cmd.Stdout, cmd.Stderr = root, os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building the sidecar: %w", err)
		}
	}
	shimEbin = os.Getenv("MEGAPHONE_SHIM_EBIN")
	if shimEbin == "" {
		cmd := exec.Command("rebar3", "compile")
		cmd.Dir, cmd.Stdout, cmd.Stderr = root, os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building the shim: %w", err)
		}
		shimEbin = filepath.Join(root, "_build", "default", "lib", "megaphone", "ebin")
	}
	return nil
}

// startEjabberd starts a private ejabberd of the target, with demo users
// and the target's shim loaded through a remote shell, the way the README
// tells operators to.
func (tg target) startEjabberd(t *testing.T, opts harness.Options) *harness.Ejabberd {
	t.Helper()
	if opts.Name == "" {
		opts.Name = "e2e"
	}
	ej := harness.MustStart(t, tg.Options(opts))
	// Runs before Stop (cleanups run last-registered first), while the
	// node's logs are still there.
	t.Cleanup(func() {
		if lines := ej.DistRefusals(); len(lines) > 0 {
			t.Errorf("%s refused something the sidecar sent over the distribution:\n%s",
				ej.Node, strings.Join(lines, "\n"))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, user := range []string{"alice", "bob"} {
		if err := ej.Register(ctx, user, "localhost", demoPassword); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := ej.LoadShim(ctx, tg.shimEbin); err != nil {
		t.Fatalf("loading the shim: %v\n%s", err, out)
	}
	return ej
}

// startEjabberd is hostTarget.startEjabberd, for tests that run on the
// host's ejabberd only.
func startEjabberd(t *testing.T, opts harness.Options) *harness.Ejabberd {
	t.Helper()
	return hostTarget.startEjabberd(t, opts)
}

// eval runs an Erlang expression on the node and fails the test on error.
func eval(t *testing.T, ej *harness.Ejabberd, expr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := ej.Eval(ctx, expr)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func evalInt(t *testing.T, ej *harness.Ejabberd, expr string) int {
	t.Helper()
	out := eval(t, ej, expr)
	n, err := strconv.Atoi(out)
	if err != nil {
		t.Fatalf("%s = %q, not an integer", expr, out)
	}
	return n
}

// leftoverExpr counts the processes a BOSH session or request leaves on
// the node: ejabberd's BOSH session and c2s processes, and the shim's
// request workers.
const leftoverExpr = `length([P || P <- erlang:processes(),
    case proc_lib:translate_initial_call(P) of
        {M, _, _} -> lists:member(M, [ejabberd_bosh, ejabberd_c2s, xmpp_stream_in, megaphone_bosh]);
        _ -> false
    end])`

// freeAddr returns a free loopback address to listen on.
// waitsOnTimers marks a test that spends most of its time waiting for a
// timeout to fire (inactivity, tick time, stall and write timeouts) rather
// than computing. Such tests run side by side (go test -parallel, see the
// Makefile's integration target) once the others are done, which keeps
// make test within its budget on two cores. Each still has its own
// ejabberd node, sidecar and ports.
func waitsOnTimers(t *testing.T) { t.Parallel() }

func freeAddr(t *testing.T) string {
	t.Helper()
	p, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", p)
}

// sidecar is one run of the real megaphone binary.
type sidecar struct {
	t    *testing.T
	cmd  *exec.Cmd
	addr string
	name string

	mu       sync.Mutex
	log      bytes.Buffer
	attached chan struct{}
	exited   chan struct{}
}

// startSidecar runs the sidecar against ej, serving BOSH on addr (a free
// port if empty), and waits until it has attached to the shim.
func startSidecar(t *testing.T, ej *harness.Ejabberd, addr string, extra ...string) *sidecar {
	t.Helper()
	s := spawnSidecar(t, ej, addr, extra...)
	s.waitAttached(t, 30*time.Second)
	return s
}

// waitAttached waits until the sidecar has attached to the shim.
func (s *sidecar) waitAttached(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-s.attached:
	case <-s.exited:
		t.Fatalf("sidecar exited before attaching:\n%s", s.logs())
	case <-time.After(limit):
		t.Fatalf("sidecar did not attach within %v:\n%s", limit, s.logs())
	}
}

// spawnSidecar is startSidecar without the wait.
func spawnSidecar(t *testing.T, ej *harness.Ejabberd, addr string, extra ...string) *sidecar {
	t.Helper()
	if addr == "" {
		port, err := harness.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr = fmt.Sprintf("127.0.0.1:%d", port)
	}
	s := &sidecar{t: t, addr: addr, attached: make(chan struct{}), exited: make(chan struct{})}
	s.name = fmt.Sprintf("megaphone_e2e_%d@localhost", time.Now().UnixNano()%1e9)
	// No admin endpoint unless a test asks for one (a later flag wins):
	// the default address would be shared by every sidecar of the run.
	args := []string{"--node", ej.Node, "--cookie-file", ej.CookieFile,
		"--name", s.name, "--bosh-addr", addr, "--admin-addr", ""}
	// MEGAPHONE_TEST_BOSH_MODE=edge runs every test's sidecar with BOSH
	// served at the edge (a test's own --bosh-mode, later, wins).
	if mode := os.Getenv("MEGAPHONE_TEST_BOSH_MODE"); mode != "" {
		args = append(args, "--bosh-mode", mode)
	}
	args = append(args, extra...)
	s.cmd = exec.Command(sidecarBin, args...)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// A pipe of our own, not StderrPipe (Wait closes that one when the
	// sidecar exits) and not io.Discard (Wait waits for its copier): a
	// successor the sidecar started (SIGUSR2) writes on after it exits.
	stderr, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr, s.cmd.Stdout = w, w
	err = s.cmd.Start()
	w.Close()
	if err != nil {
		stderr.Close()
		t.Fatal(err)
	}
	go func() {
		s.readLog(stderr)
		stderr.Close()
	}()
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(s.kill)
	return s
}

func (s *sidecar) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	once := sync.Once{}
	for sc.Scan() {
		line := sc.Text()
		s.mu.Lock()
		s.log.WriteString(line + "\n")
		s.mu.Unlock()
		// A takeover (--takeover) carries on an attachment instead.
		if strings.Contains(line, "attached to the shim") || strings.Contains(line, "took over: running") {
			once.Do(func() { close(s.attached) })
		}
	}
}

func (s *sidecar) logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

func (s *sidecar) url() string { return "http://" + s.addr + "/bosh" }

// openFiles counts the sidecar's open file descriptors: its client
// sockets, listeners and links.
func (s *sidecar) openFiles(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// kill ends the sidecar with SIGKILL, as a crash would, and waits for it.
func (s *sidecar) kill() {
	if s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGKILL)
	}
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.t.Errorf("sidecar pid %d did not exit after SIGKILL", s.cmd.Process.Pid)
	}
}

// clientResult is the JSON line test/clients/bosh_chat.mjs prints.
type clientResult struct {
	OK       bool           `json:"ok"`
	Error    string         `json:"error"`
	Mode     string         `json:"mode"`
	Sent     map[string]int `json:"sent"`
	Received map[string]int `json:"received"`
	Roster   map[string]int `json:"roster"`
	JIDs     map[string]any `json:"jids"`
	// xmpp_chat.mjs also says how the stream was carried.
	Transport string `json:"transport"`
	Secure    *bool  `json:"secure"`
}

// nodeClient is one run of an npm client script in test/clients. The
// scripts share a convention: a line starting with READY once logged in
// (the rest of the line may carry JSON), and one JSON line at the end.
type nodeClient struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer
	ready  chan string // what follows READY on its line
	result chan string // the final JSON line ("" if none came)
}

// startClient runs two real Strophe.js clients (alice and bob) over BOSH,
// or over WebSocket when url is ws://.
func startClient(t *testing.T, url string, args ...string) *nodeClient {
	t.Helper()
	return startNodeClient(t, append([]string{"bosh_chat.mjs", "--url", url, "--a", "alice@localhost",
		"--b", "bob@localhost", "--password", demoPassword}, args...)...)
}

// startNodeClient runs `node script args...` in test/clients.
func startNodeClient(t *testing.T, all ...string) *nodeClient {
	t.Helper()
	c := &nodeClient{ready: make(chan string, 1), result: make(chan string, 1)}
	c.cmd = exec.Command("node", all...)
	c.cmd.Dir = clientsDir
	c.cmd.Stderr = &c.stderr
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.cmd.Process.Kill() })
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		last := ""
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			switch {
			case strings.HasPrefix(line, "READY"):
				c.ready <- strings.TrimSpace(strings.TrimPrefix(line, "READY"))
			case strings.HasPrefix(line, "{"):
				last = line
			}
		}
		_ = c.cmd.Wait()
		c.result <- last
	}()
	return c
}

// waitReady waits for the READY line and returns what follows it.
func (c *nodeClient) waitReady(t *testing.T) string {
	t.Helper()
	select {
	case rest := <-c.ready:
		return rest
	case res := <-c.result:
		t.Fatalf("client ended before READY: %s\n%s", res, tail(c.stderr.String(), 60))
	case <-time.After(3 * time.Minute):
		t.Fatalf("client not READY within 3 minutes\n%s", tail(c.stderr.String(), 60))
	}
	return ""
}

// finished waits up to limit for the client to end and decodes its JSON
// line into v; it reports false if the client is still running.
func (c *nodeClient) finished(t *testing.T, limit time.Duration, v any) bool {
	t.Helper()
	select {
	case line := <-c.result:
		if err := json.Unmarshal([]byte(line), v); err != nil {
			t.Fatalf("client output %q: %v\n%s", line, err, tail(c.stderr.String(), 60))
		}
		return true
	case <-time.After(limit):
		return false
	}
}

// wait waits for a chat client and fails the test unless it says ok.
func (c *nodeClient) wait(t *testing.T, limit time.Duration) clientResult {
	t.Helper()
	var res clientResult
	if !c.finished(t, limit, &res) {
		t.Fatalf("client did not finish within %s\n%s", limit, tail(c.stderr.String(), 60))
	}
	if !res.OK {
		t.Fatalf("client failed: %s\n--- client stderr ---\n%s", res.Error, tail(c.stderr.String(), 60))
	}
	return res
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// waitUntil polls cond (bounded) until it holds.
func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s", what, limit)
}

// rawHTTP sends bytes on a fresh TCP connection and returns what comes back.
func rawHTTP(t *testing.T, addr string, request string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(conn)
	return string(b)
}
