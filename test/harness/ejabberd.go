// Package harness starts private, real ejabberd nodes for integration tests.
//
// Each instance is an `erl` child process of the test (modelled on
// `ejabberdctl foreground`, but without ejabberdctl: that script sources
// /etc/ejabberd/ejabberdctl.cfg, which forces EJABBERD_CONFIG_PATH, su's to
// the ejabberd user and its `stopped` command runs `epmd -kill`). Everything
// (listeners, Erlang distribution) binds to 127.0.0.1; the node has a random
// name and a random cookie kept in Dir/.erlang.cookie (HOME=Dir for every erl
// process this package runs), never on a command line or in a log.
//
// Typical use:
//
//	ej := harness.MustStart(t, harness.Options{Name: "ejtest"})
//	ej.Register(ctx, "alice", "localhost", "secret")
//	// XMPP on 127.0.0.1:ej.C2SPort, BOSH on http://127.0.0.1:<ej.HTTPPort>/bosh
package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Options configures Start. The zero value is usable.
type Options struct {
	// Name is the node name prefix; the node is Name+"_"+random@localhost.
	// Default "ejtest".
	Name string
	// Dir is the instance directory (config, cookie, spool/, logs/), a
	// path on this machine that the node can see through its Runner. If
	// empty a new temporary directory is created (in the Runner's /tmp) and
	// removed by Stop unless KeepDir is set. A non-empty Dir is never
	// removed. Reusing the Dir of a stopped instance reuses its node name,
	// so the Mnesia spool stays valid.
	Dir string
	// KeepDir keeps a temporary Dir after Stop (for post-mortems).
	KeepDir bool
	// Hosts served by ejabberd. Default ["localhost"].
	Hosts []string
	// ExtraConfig is YAML written to Dir/extra.yml and pulled in with
	// include_config_file: maps and lists (modules, listen, acl,
	// access_rules, api_permissions, ...) are merged with the generated
	// config by ejabberd; redefining a module/option that the generated
	// config already sets is rejected by ejabberd as "Duplicated option".
	ExtraConfig string
	// Log, if set, receives a copy of the node's stdout/stderr (ejabberd logs
	// to the console as well as to Dir/logs/ejabberd.log).
	Log io.Writer
	// Erl is the erl binary as seen by the Runner. Default "erl".
	Erl string
	// Runner builds every erl command (server, Eval probes, Shell).
	// Default HostRunner. See PrefixRunner for chroot-style setups.
	Runner Runner
	// Cookie, if set, is written to the instance's cookie file instead of a
	// random one: the nodes of one cluster must share it.
	Cookie string
	// StartTimeout bounds Start (in addition to its ctx). Default 30s.
	StartTimeout time.Duration
	// C2SPort and HTTPPort fix ejabberd's own listeners' ports (make run
	// uses fixed ones so its URLs stay put); 0 picks free ports.
	C2SPort, HTTPPort int
	// BOSHInactivity sets mod_bosh's max_inactivity (how long a BOSH
	// session lives without requests); 0 keeps ejabberd's default (30 s).
	BOSHInactivity time.Duration
	// ResumeTimeout sets mod_stream_mgmt's resume_timeout: how long a
	// stream-managed session waits for its client to resume after the
	// connection drops; 0 keeps ejabberd's default (300 s).
	ResumeTimeout time.Duration
	// CodePaths are added to the node's code path at boot (-pa), as an
	// operator adds the shim's ebin with ERL_OPTIONS in
	// /etc/default/ejabberd so that mod_megaphone can start with ejabberd.
	// Paths as the node sees them.
	CodePaths []string
	// MaxProcesses is the node's process limit (erl +P); 0: 250,000.
	// Every session costs at least one process (its c2s), so a run of
	// more sessions than that needs it raised.
	MaxProcesses int
	// MaxPorts is the node's port limit (ERL_MAX_PORTS: every socket the
	// node itself holds is a port); 0: 32,000. The open-files limit
	// caps the node's sockets below it on this machine anyway.
	MaxPorts int
	// DistTLS runs the node's distribution over TLS (-proto_dist inet_tls
	// with a test CA; both ends must present a certificate it signed), and
	// the harness's own probes and shells with it. The files are in
	// Ejabberd.DistTLS.
	DistTLS bool
}

// Ejabberd is a running (or stopped) private ejabberd node.
type Ejabberd struct {
	Node       string // e.g. "ejtest_ab12cd34@localhost"
	Dir        string // instance dir (host path; the node sees Runner.NodePath(Dir))
	CookieFile string // Dir/.erlang.cookie, mode 0400 (host path: what the sidecar reads)
	C2SPort    int    // ejabberd_c2s on 127.0.0.1, plain XMPP (no STARTTLS offered)
	HTTPPort   int    // ejabberd_http on 127.0.0.1: /bosh (mod_bosh), /ws (ejabberd_http_ws)
	Pid        int    // PID of the node's OS process (beam.smp; erl execs it)
	Hosts      []string
	ConfigFile string // Dir/ejabberd.yml
	LogFile    string // Dir/logs/ejabberd.log
	ConsoleLog string // Dir/logs/console.log (node stdout/stderr)
	LibDir     string // detected ejabberd application dir, as seen by the node
	// DistTLS holds the files of a node started with Options.DistTLS
	// (zero otherwise).
	DistTLS DistTLSFiles

	erl     string
	runner  Runner
	tempDir bool
	keepDir bool

	cmd     *exec.Cmd
	done    chan struct{} // closed when the node process has been reaped
	waitErr error

	stopOnce sync.Once
	stopErr  error
}

// pickPorts chooses the listener ports (a variable so tests can simulate a
// port being taken between FreePort and ejabberd's bind).
var pickPorts = freePorts

var nameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_-]{0,40}$`)

// MustStart is Start for tests: it fails t on error and registers Stop with
// t.Cleanup.
func MustStart(t testing.TB, opts Options) *Ejabberd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("harness: start ejabberd: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Stop(); err != nil {
			t.Errorf("harness: stop ejabberd: %v", err)
		}
	})
	return e
}

// Start creates the instance directory and configuration, starts erl as a
// child process and waits (bounded) until the ejabberd application is
// running and both listeners accept connections. On failure the node is
// killed and the error carries the tail of its logs.
func Start(ctx context.Context, opts Options) (*Ejabberd, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if opts.Name == "" {
		opts.Name = "ejtest"
	}
	if !nameRE.MatchString(opts.Name) {
		return nil, fmt.Errorf("harness: bad node name prefix %q", opts.Name)
	}
	if len(opts.Hosts) == 0 {
		opts.Hosts = []string{"localhost"}
	}
	if opts.Erl == "" {
		opts.Erl = "erl"
	}
	if opts.Runner == nil {
		opts.Runner = HostRunner
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, opts.StartTimeout)
	defer cancel()

	libDir, err := FindEjabberd(opts.Runner)
	if err != nil {
		return nil, err
	}

	e := &Ejabberd{
		Hosts:   append([]string(nil), opts.Hosts...),
		LibDir:  libDir,
		erl:     opts.Erl,
		runner:  opts.Runner,
		keepDir: opts.KeepDir,
	}
	if opts.Dir == "" {
		// Behind a chroot the node must see its own directory: it goes
		// in the target's /tmp.
		d, err := os.MkdirTemp(tempBase(opts.Runner), "megaphone-ejabberd-")
		if err != nil {
			return nil, fmt.Errorf("harness: %w", err)
		}
		e.Dir, e.tempDir = d, true
	} else {
		d, err := filepath.Abs(opts.Dir)
		if err != nil {
			return nil, fmt.Errorf("harness: %w", err)
		}
		e.Dir = d
	}
	fail := func(err error) (*Ejabberd, error) {
		e.Kill()
		if e.tempDir && !e.keepDir {
			os.RemoveAll(e.Dir)
			err = fmt.Errorf("%w\n(temporary dir %s removed; set Options.KeepDir to keep it)", err, e.Dir)
		}
		return nil, err
	}
	if err := e.prepareDir(opts); err != nil {
		return fail(err)
	}
	if opts.DistTLS {
		if e.DistTLS, err = writeDistTLS(e.Dir, e.runner.NodePath); err != nil {
			return fail(fmt.Errorf("harness: distribution TLS files: %w", err))
		}
	}

	// A port picked by FreePort can be grabbed by someone else before
	// ejabberd binds it; retry a few times with fresh ports in that case.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		err := e.startOnce(ctx, opts)
		if err == nil {
			return e, nil
		}
		if attempt >= attempts || ctx.Err() != nil || !strings.Contains(err.Error(), "eaddrinuse") {
			return fail(err)
		}
		e.Kill()
	}
}

// prepareDir creates Dir, spool/, logs/, the cookie file and picks the node
// name (reused from Dir/nodename when the spool already exists).
// distArgs are the distribution flags of every erl the instance runs: the
// node, its probes and shells must speak the same distribution.
func (e *Ejabberd) distArgs() []string {
	args := append([]string(nil), loopbackDist...)
	if e.DistTLS.OptFile != "" {
		args = append(args, "-proto_dist", "inet_tls", "-ssl_dist_optfile", e.runner.NodePath(e.DistTLS.OptFile))
	}
	return args
}

func (e *Ejabberd) prepareDir(opts Options) error {
	for _, d := range []string{e.Dir, filepath.Join(e.Dir, "spool"), filepath.Join(e.Dir, "logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("harness: %w", err)
		}
	}
	e.ConfigFile = filepath.Join(e.Dir, "ejabberd.yml")
	e.LogFile = filepath.Join(e.Dir, "logs", "ejabberd.log")
	e.ConsoleLog = filepath.Join(e.Dir, "logs", "console.log")

	nameFile := filepath.Join(e.Dir, "nodename")
	if b, err := os.ReadFile(nameFile); err == nil {
		if _, err := os.Stat(filepath.Join(e.Dir, "spool", "schema.DAT")); err == nil {
			e.Node = strings.TrimSpace(string(b))
		}
	}
	if e.Node == "" {
		e.Node = opts.Name + "_" + randHex(4) + "@" + ErlNodeHost()
		if err := os.WriteFile(nameFile, []byte(e.Node+"\n"), 0o600); err != nil {
			return fmt.Errorf("harness: %w", err)
		}
	}

	// The cookie lives only in this file: erl reads $HOME/.erlang.cookie
	// and insists that nobody but the owner can read it.
	e.CookieFile = filepath.Join(e.Dir, ".erlang.cookie")
	if st, err := os.Stat(e.CookieFile); err == nil && st.Size() > 0 {
		if err := os.Chmod(e.CookieFile, 0o400); err != nil {
			return fmt.Errorf("harness: %w", err)
		}
	} else {
		f, err := os.OpenFile(e.CookieFile, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_EXCL, 0o400)
		if err != nil {
			return fmt.Errorf("harness: cookie: %w", err)
		}
		cookie := opts.Cookie
		if cookie == "" {
			cookie = randCookie()
		}
		_, werr := f.WriteString(cookie)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return fmt.Errorf("harness: cookie: %w", werr)
		}
	}
	return nil
}

// startOnce writes the config with fresh ports, starts the node and waits
// for it. On error the node may still be running; the caller kills it.
func (e *Ejabberd) startOnce(ctx context.Context, opts Options) error {
	ports, err := pickPorts(2)
	if err != nil {
		return err
	}
	e.C2SPort, e.HTTPPort = ports[0], ports[1]
	if opts.C2SPort != 0 {
		e.C2SPort = opts.C2SPort
	}
	if opts.HTTPPort != 0 {
		e.HTTPPort = opts.HTTPPort
	}

	extra := ""
	if strings.TrimSpace(opts.ExtraConfig) != "" {
		p := filepath.Join(e.Dir, "extra.yml")
		if err := os.WriteFile(p, []byte(opts.ExtraConfig), 0o600); err != nil {
			return fmt.Errorf("harness: %w", err)
		}
		extra = e.runner.NodePath(p)
	}
	cfg := renderConfig(configParams{Hosts: e.Hosts, C2SPort: e.C2SPort, HTTPPort: e.HTTPPort, ExtraFile: extra,
		BOSHInactivity: int(opts.BOSHInactivity / time.Second), ResumeTimeout: int(opts.ResumeTimeout / time.Second)})
	if err := os.WriteFile(e.ConfigFile, []byte(cfg), 0o600); err != nil {
		return fmt.Errorf("harness: %w", err)
	}

	console, err := os.OpenFile(e.ConsoleLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("harness: %w", err)
	}
	var out io.Writer = console
	if opts.Log != nil {
		out = io.MultiWriter(console, safeWriter{opts.Log})
	}

	np := e.runner.NodePath
	env := baseEnv(np(e.Dir),
		"ERL_LIBS="+filepath.Dir(e.LibDir),
		"EJABBERD_CONFIG_PATH="+np(e.ConfigFile),
		"EJABBERD_LOG_PATH="+np(e.LogFile),
		"ERL_CRASH_DUMP="+np(filepath.Join(e.Dir, "erl_crash.dump")),
		"ERL_MAX_PORTS="+strconv.Itoa(orInt(opts.MaxPorts, 32000)),
		"ERL_MAX_ETS_TABLES=1400",
	)
	args := []string{
		"-sname", e.Node,
		"+K", "true", "+P", strconv.Itoa(orInt(opts.MaxProcesses, 250000)),
	}
	args = append(args, e.distArgs()...)
	for _, p := range opts.CodePaths {
		args = append(args, "-pa", p)
	}
	args = append(args,
		"-mnesia", "dir", strconv.Quote(np(filepath.Join(e.Dir, "spool"))),
		"-s", "ejabberd",
		"-noinput",
	)
	cmd := e.runner.Command(e.erl, env, args...)
	cmd.Dir = e.Dir
	cmd.Stdin = nil
	cmd.Stdout = out
	cmd.Stderr = out
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	// If the test binary dies without calling Stop (e.g. go test -timeout
	// panic), the kernel kills the node instead of leaking it.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		console.Close()
		return fmt.Errorf("harness: start %s: %w", e.erl, err)
	}
	e.cmd = cmd
	e.Pid = cmd.Process.Pid
	e.done = make(chan struct{})
	go func(done chan struct{}) {
		e.waitErr = cmd.Wait()
		console.Close()
		close(done)
	}(e.done)

	if err := e.waitStarted(ctx); err != nil {
		return fmt.Errorf("%w\n%s", err, e.LogTail())
	}
	return nil
}

// waitStarted polls the node (bounded in count and by ctx) until ejabberd is
// running, then until both listeners accept TCP connections.
func (e *Ejabberd) waitStarted(ctx context.Context) error {
	const want = "{{started,started},true}"
	const maxPolls = 300
	last := ""
	ready := false
	for i := 0; i < maxPolls && !ready; i++ {
		if e.exited() {
			return fmt.Errorf("harness: node %s exited during start (%v)", e.Node, e.waitErr)
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		v, err := e.Eval(pctx,
			"{init:get_status(), lists:keymember(ejabberd, 1, application:which_applications())}")
		cancel()
		if err == nil && v == want {
			ready = true
			break
		}
		if err != nil {
			last = err.Error()
		} else {
			last = v
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: node %s not started: %w (last probe: %s)", e.Node, ctx.Err(), last)
		case <-e.done:
		case <-time.After(200 * time.Millisecond):
		}
	}
	if !ready {
		return fmt.Errorf("harness: node %s not started after %d polls (last probe: %s)", e.Node, maxPolls, last)
	}
	for _, port := range []int{e.C2SPort, e.HTTPPort} {
		if err := waitTCP(ctx, e, port); err != nil {
			return err
		}
	}
	return nil
}

func waitTCP(ctx context.Context, e *Ejabberd, port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var lastErr error
	for i := 0; i < 100; i++ {
		d := net.Dialer{Timeout: time.Second}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		lastErr = err
		if e.exited() {
			return fmt.Errorf("harness: node %s exited before %s was listening", e.Node, addr)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: %s not listening: %w (%v)", addr, ctx.Err(), lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("harness: %s not listening: %v", addr, lastErr)
}

// exited reports whether the node process has exited (and been reaped).
func (e *Ejabberd) exited() bool {
	if e.done == nil {
		return true
	}
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

// Alive reports whether the node's OS process is still running.
func (e *Ejabberd) Alive() bool { return !e.exited() && pidAlive(e.Pid) }

// Done is closed once the node process has exited and been reaped.
func (e *Ejabberd) Done() <-chan struct{} { return e.done }

// LogTail returns the last lines of the console output and the ejabberd
// log files, for error messages.
func (e *Ejabberd) LogTail() string {
	var b strings.Builder
	for _, f := range []string{e.ConsoleLog, filepath.Join(e.Dir, "logs", "error.log"), filepath.Join(e.Dir, "logs", "crash.log")} {
		if t := strings.TrimSpace(tailFile(f, 4000)); t != "" {
			fmt.Fprintf(&b, "--- %s ---\n%s\n", f, t)
		}
	}
	if b.Len() == 0 {
		return "(no log output)"
	}
	return b.String()
}

// Register creates user@host with password (ejabberd_auth:try_register/3).
// An already existing user is not an error.
func (e *Ejabberd) Register(ctx context.Context, user, host, password string) error {
	v, err := e.Eval(ctx, fmt.Sprintf("ejabberd_auth:try_register(%s, %s, %s)",
		erlBinary(user), erlBinary(host), erlBinary(password)))
	if err != nil {
		return fmt.Errorf("harness: register %s@%s: %w", user, host, err)
	}
	switch v {
	case "ok", "{error,exists}":
		return nil
	}
	return fmt.Errorf("harness: register %s@%s: %s", user, host, v)
}

// LoadShim adds ebinDir (a path as seen by the node) to the node's code path
// and starts the `megaphone` application, the way an operator would in a
// remote shell. It returns the shell transcript and checks with Eval that
// the application is running.
func (e *Ejabberd) LoadShim(ctx context.Context, ebinDir string) (string, error) {
	if !filepath.IsAbs(ebinDir) {
		abs, err := filepath.Abs(ebinDir)
		if err != nil {
			return "", fmt.Errorf("harness: %w", err)
		}
		ebinDir = e.runner.NodePath(abs)
	}
	if _, err := os.Stat(e.runner.HostPath(ebinDir)); err != nil {
		return "", fmt.Errorf("harness: shim ebin: %w", err)
	}
	ctx, cancel := withDefaultTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := e.Shell(ctx,
		fmt.Sprintf("code:add_patha(%s).", erlString(ebinDir)),
		"megaphone:start().",
	)
	if err != nil {
		return out, err
	}
	v, err := e.Eval(ctx, "lists:keymember(megaphone, 1, application:which_applications())")
	if err != nil {
		return out, fmt.Errorf("harness: shim check: %w", err)
	}
	if v != "true" {
		return out, fmt.Errorf("harness: application megaphone is not running after LoadShim; shell output:\n%s", out)
	}
	return out, nil
}

// Stop stops the node gracefully (rpc init:stop/0), waits up to 20 s for the
// process to exit, then SIGKILLs it. A temporary Dir is removed unless
// KeepDir. Stop never touches epmd. It is idempotent.
func (e *Ejabberd) Stop() error {
	e.stopOnce.Do(func() { e.stopErr = e.stop() })
	return e.stopErr
}

func (e *Ejabberd) stop() error {
	var errs []error
	if !e.exited() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		v, err := e.Eval(ctx, "init:stop()")
		cancel()
		if err == nil && v != "ok" {
			err = fmt.Errorf("init:stop() returned %s", v)
		}
		select {
		case <-e.done:
		case <-time.After(20 * time.Second):
			if err != nil {
				errs = append(errs, fmt.Errorf("harness: rpc init:stop on %s: %w", e.Node, err))
			}
			errs = append(errs, fmt.Errorf("harness: node %s (pid %d) did not stop within 20s; killed", e.Node, e.Pid))
			if kerr := e.Kill(); kerr != nil {
				errs = append(errs, kerr)
			}
		}
	}
	if e.tempDir && !e.keepDir {
		if err := os.RemoveAll(e.Dir); err != nil {
			errs = append(errs, fmt.Errorf("harness: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Kill SIGKILLs the node process (and its process group: erl_child_setup,
// port programs) and waits for it to be reaped. It does not remove Dir; call
// Stop afterwards for that.
func (e *Ejabberd) Kill() error {
	if e.cmd == nil || e.exited() {
		return nil
	}
	_ = e.cmd.Process.Signal(syscall.SIGKILL)
	killTree(e.Pid)
	select {
	case <-e.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("harness: node %s (pid %d) still not reaped 10s after SIGKILL", e.Node, e.Pid)
	}
}

func orInt(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

// safeWriter shields the node's output copier from a writer that fails or
// panics (e.g. a testing.T-backed writer used after the test finished).
type safeWriter struct{ w io.Writer }

func (s safeWriter) Write(p []byte) (n int, err error) {
	defer func() {
		if recover() != nil {
			n, err = len(p), nil
		}
	}()
	_, _ = s.w.Write(p)
	return len(p), nil
}
