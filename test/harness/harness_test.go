package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testLog is the Options.Log for tests: the node's console only shows up with
// HARNESS_LOG=1 (it is always in Dir/logs/console.log).
func testLog() io.Writer {
	if os.Getenv("HARNESS_LOG") != "" {
		return os.Stderr
	}
	return nil
}

// testTargets returns the targets to run on (see Targets): a missing
// Debian 13 chroot fails the test when MEGAPHONE_REQUIRE_TRIXIE=1.
func testTargets(t *testing.T) []Target {
	t.Helper()
	ts, err := Targets()
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// TestEjabberd runs the whole Start/Eval/Register/Shell/LoadShim/Stop
// cycle on every target, the Debian 13 chroot included.
func TestEjabberd(t *testing.T) {
	t.Parallel()
	for _, tg := range testTargets(t) {
		t.Run(tg.Name, func(t *testing.T) {
			t.Parallel()
			testEjabberd(t, tg)
		})
	}
}

func testEjabberd(t *testing.T, tg Target) {
	if _, err := FindEjabberd(tg.Runner); err != nil {
		t.Skip(err)
	}
	t.Logf("target %s: %s", tg.Name, tg.Desc)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t0 := time.Now()
	e, err := Start(ctx, tg.Options(Options{Name: "ejtest", Log: testLog()}))
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			e.Stop()
		}
	}()
	t.Logf("started %s pid=%d c2s=%d http=%d dir=%s lib=%s in %v",
		e.Node, e.Pid, e.C2SPort, e.HTTPPort, e.Dir, e.LibDir, time.Since(t0).Round(time.Millisecond))

	t.Run("cookie", func(t *testing.T) {
		st, err := os.Stat(e.CookieFile)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o400 {
			t.Errorf("cookie mode %v, want 0400", st.Mode().Perm())
		}
		cookie, _ := os.ReadFile(e.CookieFile)
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", e.Pid))
		if len(cookie) < 20 || bytes.Contains(cmdline, cookie) {
			t.Errorf("cookie too short or visible in argv")
		}
		logs, _ := os.ReadFile(e.ConsoleLog)
		if bytes.Contains(logs, cookie) {
			t.Errorf("cookie appears in console log")
		}
	})

	t.Run("eval", func(t *testing.T) {
		v, err := e.Eval(ctx, "erlang:node()")
		if err != nil {
			t.Fatal(err)
		}
		if v != e.Node {
			t.Fatalf("Eval(erlang:node()) = %q, want %q", v, e.Node)
		}
		v, err = e.Eval(ctx, "X = 20, Y = 22, X + Y.")
		if err != nil || v != "42" {
			t.Errorf("multi-expression Eval = %q, %v", v, err)
		}
		if _, err := e.Eval(ctx, "erlang:error(boom)"); !errors.Is(err, ErrBadRPC) || !strings.Contains(err.Error(), "boom") {
			t.Errorf("Eval of an exception: err = %v, want badrpc with boom", err)
		}
		if _, err := e.Eval(ctx, "1 +"); err == nil {
			t.Errorf("Eval of a syntax error succeeded")
		}
	})

	t.Run("register", func(t *testing.T) {
		if err := e.Register(ctx, "alice", "localhost", "s3cr\"et"); err != nil {
			t.Fatal(err)
		}
		if err := e.Register(ctx, "alice", "localhost", "s3cr\"et"); err != nil {
			t.Fatalf("duplicate Register: %v", err)
		}
		v, err := e.Eval(ctx, `ejabberd_auth:check_password(<<"alice">>, <<>>, <<"localhost">>, <<"s3cr\"et">>)`)
		if err != nil || v != "true" {
			t.Fatalf("check_password = %q, %v", v, err)
		}
		if err := e.Register(ctx, "bob", "not-served.example", "x"); err == nil {
			t.Errorf("Register on an unknown host succeeded")
		}
	})

	t.Run("shell", func(t *testing.T) {
		out, err := e.Shell(ctx, "1+1.", "node().", `io:format("hello~n").`)
		t.Logf("shell transcript:\n%s", out)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "2\n") {
			t.Errorf("no 2 in shell output")
		}
		// node() in the shell must be the ejabberd node: it is a remote shell.
		if !strings.Contains(out, "\n"+e.Node+"\n") {
			t.Errorf("shell did not run on %s", e.Node)
		}
		if !e.Alive() {
			t.Fatal("ejabberd died after Shell")
		}
		if v, err := e.Eval(ctx, "erlang:node()"); err != nil || v != e.Node {
			t.Fatalf("after Shell: Eval = %q, %v", v, err)
		}
		if _, err := e.Shell(ctx, "q()."); err == nil {
			t.Errorf("Shell accepted q().")
		}
		if v, err := e.Eval(ctx, "length([N || N <- nodes(hidden), lists:prefix(\"ctl_\", atom_to_list(N))])"); err != nil || v != "0" {
			t.Errorf("ctl node still connected: %q, %v", v, err)
		}
	})

	t.Run("loadshim", func(t *testing.T) {
		// A stand-in application named megaphone with the operator's entry
		// point, megaphone:start/0, made up on the fly: the real shim is
		// tested in test/.
		// Built inside the target, by its own erlc.
		dir, err := tg.TempDir("harness-dummy-shim-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		ebin := filepath.Join(dir, "ebin")
		if err := os.MkdirAll(ebin, 0o755); err != nil {
			t.Fatal(err)
		}
		app := `{application, megaphone, [{description, "dummy shim"}, {vsn, "0.0.0"}, {modules, [megaphone]}, {registered, []}, {applications, [kernel, stdlib]}]}.` + "\n"
		if err := os.WriteFile(filepath.Join(ebin, "megaphone.app"), []byte(app), 0o644); err != nil {
			t.Fatal(err)
		}
		src := filepath.Join(dir, "megaphone.erl")
		mod := "-module(megaphone).\n-export([start/0]).\nstart() -> {ok, _} = application:ensure_all_started(megaphone), started_dummy.\n"
		if err := os.WriteFile(src, []byte(mod), 0o644); err != nil {
			t.Fatal(err)
		}
		np := tg.Runner.NodePath
		erlc := tg.Runner.Command(tg.Erlc, baseEnv(np(dir)), "-o", np(ebin), np(src))
		if out, err := erlc.CombinedOutput(); err != nil {
			t.Fatalf("erlc: %v\n%s", err, out)
		}
		out, err := e.LoadShim(ctx, np(ebin))
		t.Logf("LoadShim transcript:\n%s", out)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "started_dummy") {
			t.Errorf("unexpected LoadShim output")
		}
	})

	t.Run("bosh", func(t *testing.T) {
		c := http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(e.HTTPPort) + "/bosh")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !bytes.Contains(body, []byte("mod_bosh")) {
			t.Fatalf("GET /bosh: %d %q", resp.StatusCode, body)
		}
		v, err := e.Eval(ctx, `gen_mod:is_loaded(<<"localhost">>, mod_bosh)`)
		if err != nil || v != "true" {
			t.Fatalf("mod_bosh loaded = %q, %v", v, err)
		}
	})

	t.Run("c2s", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(e.C2SPort), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(c, `<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>`)
		var got []byte
		buf := make([]byte, 4096)
		for i := 0; i < 50 && !bytes.Contains(got, []byte("</stream:features>")); i++ {
			n, err := c.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				break
			}
		}
		if !bytes.Contains(got, []byte("<mechanism>PLAIN</mechanism>")) {
			t.Fatalf("c2s features without PLAIN: %s", got)
		}
	})

	pid, node, dir := e.Pid, e.Node, e.Dir
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	stopped = true
	if pidAlive(pid) {
		t.Errorf("pid %d still alive after Stop", pid)
	}
	if procs := processesMentioning(node); len(procs) > 0 {
		t.Errorf("processes still mentioning %s: %v", node, procs)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("temp dir %s not removed: %v", dir, err)
	}
	if err := e.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	t.Logf("total %v", time.Since(t0).Round(time.Millisecond))
}

// TestRestartKeepsData checks Kill + a restart on the same Dir (same node
// name, same Mnesia spool) and ExtraConfig merging.
func TestRestartKeepsData(t *testing.T) {
	t.Parallel()
	if _, err := FindEjabberd(nil); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	extra := "modules:\n  mod_vcard: {}\n"
	e := MustStart(t, Options{Name: "ejkeep", Dir: dir, ExtraConfig: extra, Log: testLog()})
	if err := e.Register(ctx, "carol", "localhost", "pw"); err != nil {
		t.Fatal(err)
	}
	if v, err := e.Eval(ctx, `gen_mod:is_loaded(<<"localhost">>, mod_vcard)`); err != nil || v != "true" {
		t.Fatalf("ExtraConfig module not loaded: %q, %v", v, err)
	}
	// Make sure the registration reached the disk before the hard kill.
	if _, err := e.Eval(ctx, "mnesia:sync_log()"); err != nil {
		t.Fatal(err)
	}
	pid := e.Pid
	if err := e.Kill(); err != nil {
		t.Fatal(err)
	}
	if pidAlive(pid) {
		t.Fatalf("pid %d alive after Kill", pid)
	}
	e2 := MustStart(t, Options{Name: "ejkeep", Dir: dir, Log: testLog()})
	if e2.Node != e.Node {
		t.Errorf("node name changed on restart: %s -> %s", e.Node, e2.Node)
	}
	v, err := e2.Eval(ctx, `ejabberd_auth:user_exists(<<"carol">>, <<"localhost">>)`)
	if err != nil || v != "true" {
		t.Fatalf("user lost after restart: %q, %v", v, err)
	}
}

// processesMentioning lists PIDs whose command line contains s.
func processesMentioning(s string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(s)) && pidAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestConfigAndHelpers(t *testing.T) {
	cfg := renderConfig(configParams{Hosts: []string{"localhost", "example.test"}, C2SPort: 1, HTTPPort: 2, ExtraFile: "/x/extra.yml"})
	for _, want := range []string{`  - "example.test"`, "port: 1\n", "/bosh: mod_bosh", "/ws: ejabberd_http_ws", `include_config_file: "/x/extra.yml"`, "mod_bosh: {}"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q", want)
		}
	}
	if strings.Contains(cfg, "::") && strings.Contains(cfg, `ip: "::"`) {
		t.Errorf("listener not on loopback")
	}
	if got := erlString("a\"b\\c\né"); got != `"a\"b\\c\x{A}\x{E9}"` {
		t.Errorf("erlString = %s", got)
	}
	r := PrefixRunner{Prefix: []string{"chroot", "/srv/r"}, Root: "/srv/r"}
	if got := r.NodePath("/srv/r/tmp/x"); got != "/tmp/x" {
		t.Errorf("NodePath = %s", got)
	}
	if got := r.HostPath("/tmp/x"); got != "/srv/r/tmp/x" {
		t.Errorf("HostPath = %s", got)
	}
	if cmd := r.Command("erl", nil, "-noinput"); strings.Join(cmd.Args, " ") != "chroot /srv/r erl -noinput" {
		t.Errorf("Command = %v", cmd.Args)
	}
	p1, err := FreePort()
	if err != nil || p1 <= 0 {
		t.Fatalf("FreePort = %d, %v", p1, err)
	}
}

// TestStartFailureReportsLog checks that a broken config fails fast with the
// node's log in the error and leaves nothing behind.
func TestStartFailureReportsLog(t *testing.T) {
	t.Parallel()
	if _, err := FindEjabberd(nil); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	// mod_bosh is already in the generated config: ejabberd refuses duplicates.
	e, err := Start(ctx, Options{Name: "ejbad", ExtraConfig: "modules:\n  mod_bosh: {}\n"})
	if err == nil {
		e.Stop()
		t.Fatal("Start with a duplicated module succeeded")
	}
	t.Logf("error after %v: %v", time.Since(t0).Round(time.Millisecond), err)
	if !strings.Contains(err.Error(), "Duplicated option") {
		t.Errorf("error does not carry the log tail")
	}
	node := regexp.MustCompile(`ejbad_[0-9a-f]+@localhost`).FindString(err.Error())
	if node == "" {
		t.Fatalf("node name not in error")
	}
	if procs := processesMentioning(node); len(procs) > 0 {
		t.Errorf("leftover processes: %v", procs)
	}
}

// TestPortTakenRetries simulates another process grabbing the C2S port
// between FreePort and ejabberd's bind: Start must retry with new ports.
// Not parallel: it swaps pickPorts.
func TestPortTakenRetries(t *testing.T) {
	if _, err := FindEjabberd(nil); err != nil {
		t.Skip(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	calls := 0
	orig := pickPorts
	pickPorts = func(n int) ([]int, error) {
		calls++
		ports, err := orig(n)
		if err == nil && calls == 1 {
			ports[0] = busyPort
		}
		return ports, err
	}
	defer func() { pickPorts = orig }()

	e := MustStart(t, Options{Name: "ejbusy", Log: testLog()})
	if calls < 2 || e.C2SPort == busyPort {
		t.Fatalf("no retry: calls=%d c2s=%d busy=%d", calls, e.C2SPort, busyPort)
	}
	t.Logf("retried %d times; first attempt:\n%s", calls-1, firstFailure(e.ConsoleLog))
}

func firstFailure(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		if strings.Contains(l, "eaddrinuse") {
			return strings.Join(lines[max(0, i-3):i+1], "\n")
		}
	}
	return "(no eaddrinuse line)"
}
