package node

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/test/harness"
	"go.uber.org/zap/zaptest"
)

// peerProgram runs in a real Erlang node. Its 'peer' process does what the
// test asks and answers to the sender's pid, which it takes from messages.
const peerProgram = `
Loop = fun Loop() ->
  receive
    {nodes, P} -> P ! {nodes, nodes(), nodes(hidden)};
    {ping, P, N} -> P ! {ping, net_adm:ping(N)};
    {echo, P, M} -> P ! {echo, M};
    {link, P} -> link(P), P ! linked;
    {unlink, P} -> unlink(P), P ! unlinked;
    {monitor, P} -> erlang:monitor(process, P), P ! monitored;
    {exit, P} -> exit(P, kill), P ! exited;
    {group_leader, P} -> group_leader(P, self()), group_leader(whereis(user), self()), P ! gl;
    {whoami, P} -> P ! {pid, self()};
    {links, P} -> {links, L} = process_info(self(), links), P ! {links, L};
    {die, Reason} -> exit(Reason);
    {flood, P, N} -> [P ! {seq, I} || I <- lists:seq(1, N)], P ! flooded;
    {count, P, N} ->
      R = (fun C(I) when I > N -> ok;
               C(I) -> receive {seq, I} -> C(I + 1); {seq, J} -> {bad, I, J}
                       after 10000 -> {timeout, I} end end)(1),
      P ! {counted, R}
  end,
  Loop()
end,
%% The peer is a process of its own, not the -eval process: that one runs
%% during boot, and its death ({die, R}) halts the whole node (OTP 25 and 27)
%% ("Runtime terminating during boot") before 'EXIT' and 'DOWN' reach us.
register(peer, spawn(fun() -> Loop() end)),
io:format("ready~n"),
receive after infinity -> ok end.
`

type collector struct {
	mu   sync.Mutex
	msgs []etf.Term
	cond *sync.Cond
	// {seq, N} messages are checked as they arrive, not stored.
	seqNext int64
	seqErr  error
}

func newCollector() *collector {
	c := &collector{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *collector) handle(_ *Link, d Delivery) {
	c.mu.Lock()
	if tup, ok := d.Msg.(etf.Tuple); ok && len(tup) == 2 && tup[0] == etf.Atom("seq") {
		c.seqNext++
		if tup[1] != c.seqNext && c.seqErr == nil {
			c.seqErr = fmt.Errorf("message %d arrived as %v", c.seqNext, tup[1])
		}
	} else {
		c.msgs = append(c.msgs, d.Msg)
	}
	c.mu.Unlock()
	c.cond.Broadcast()
}

// waitFor returns the first message (removing it and all before it) for
// which match is true.
func (c *collector) waitFor(t *testing.T, what string, match func(etf.Term) bool) etf.Term {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	timer := time.AfterFunc(20*time.Second, c.cond.Broadcast)
	defer timer.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for time.Now().Before(deadline) {
		for i, m := range c.msgs {
			if match(m) {
				c.msgs = c.msgs[i+1:]
				return m
			}
		}
		c.cond.Wait()
	}
	t.Fatalf("no %s within 20s", what)
	return nil
}

func tagged(tag etf.Atom) func(etf.Term) bool {
	return func(m etf.Term) bool {
		if a, ok := m.(etf.Atom); ok {
			return a == tag
		}
		tup, ok := m.(etf.Tuple)
		return ok && len(tup) > 0 && tup[0] == tag
	}
}

// peerTargets returns every Erlang/OTP this machine can run a peer on: the
// host's, and the Debian 13 chroot's (OTP 27) when it is built. With
// MEGAPHONE_REQUIRE_TRIXIE=1 a missing chroot fails the test.
func peerTargets(t *testing.T) []harness.Target {
	t.Helper()
	ts, err := harness.Targets()
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// forEachPeer runs f as a subtest per target.
func forEachPeer(t *testing.T, f func(t *testing.T, tg harness.Target)) {
	for _, tg := range peerTargets(t) {
		t.Run(tg.Name, func(t *testing.T) {
			t.Logf("peer on %s", tg.Desc)
			f(t, tg)
		})
	}
}

// peerNode is a real Erlang node running peerProgram.
type peerNode struct {
	name, cookie string
	mu           sync.Mutex
	out          bytes.Buffer // the node's stdout and stderr
}

func (p *peerNode) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Write collects the node's output (stdout and stderr).
func (p *peerNode) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

// checkQuiet fails t if the peer logged a refusal of anything we sent
// (harness.DistRefusal: "cannot handle", "malformed", ...).
func (p *peerNode) checkQuiet(t *testing.T) {
	t.Helper()
	if out := p.output(); harness.DistRefusal.MatchString(out) {
		t.Errorf("the peer complained about us:\n%s", out)
	}
}

func startPeer(t *testing.T, tg harness.Target, extraArgs ...string) *peerNode {
	t.Helper()
	if tg.Root == "" {
		if _, err := exec.LookPath(tg.Erl); err != nil {
			t.Skip("erl not installed; run make deps")
		}
	}
	// The node reads $HOME/.erlang.cookie, so HOME must be inside its root.
	dir, err := tg.TempDir("nodetest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	b := make([]byte, 12)
	rand.Read(b)
	p := &peerNode{cookie: hex.EncodeToString(b)}
	if err := os.WriteFile(filepath.Join(dir, ".erlang.cookie"), []byte(p.cookie), 0o400); err != nil {
		t.Fatal(err)
	}
	p.name = "nodetest_" + hex.EncodeToString(b[:4]) + "@localhost"
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + tg.Runner.NodePath(dir), "ERL_EPMD_ADDRESS=127.0.0.1"}
	args := append([]string{"-sname", p.name, "-noinput",
		"-kernel", "inet_dist_use_interface", "{127,0,0,1}"}, extraArgs...)
	cmd := tg.Runner.Command(tg.Erl, env, append(args, "-eval", peerProgram)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = p
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(out)
		once := sync.Once{}
		for sc.Scan() {
			p.Write(append(sc.Bytes(), '\n'))
			if sc.Text() == "ready" {
				once.Do(func() { close(ready) })
			}
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-copied:
		case <-time.After(5 * time.Second):
		}
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("peer %s output:\n%s", p.name, p.output())
		}
	})
	select {
	case <-ready:
	case <-copied:
		t.Fatalf("erl exited before it was ready:\n%s", p.output())
	case <-time.After(30 * time.Second):
		t.Fatalf("erl did not start:\n%s", p.output())
	}
	return p
}

// connected is a sidecar node with a live link to a peer.
type connected struct {
	node *Node
	link *Link
	in   *collector
}

// dialPeer makes a sidecar node called name and links it to the peer.
func dialPeer(t *testing.T, p *peerNode, cfg Config) *connected {
	t.Helper()
	return dialPeerVia(t, p, cfg, func(h Handler) Handler { return h })
}

// dialPeerVia is dialPeer with the collector's handler wrapped by wrap.
func dialPeerVia(t *testing.T, p *peerNode, cfg Config, wrap func(Handler) Handler) *connected {
	t.Helper()
	cfg.Cookie, cfg.Logger = p.cookie, zaptest.NewLogger(t)
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := newCollector()
	link, err := n.Dial(context.Background(), p.name, wrap(c.handle))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(link.Close)
	return &connected{node: n, link: link, in: c}
}

// send sends msg to the peer's 'peer' process.
func (c *connected) send(t *testing.T, msg etf.Term) {
	t.Helper()
	if err := c.link.RegSend("peer", msg); err != nil {
		t.Fatal(err)
	}
}

func TestRealDistributionLink(t *testing.T) { forEachPeer(t, testRealDistributionLink) }

func testRealDistributionLink(t *testing.T, tg harness.Target) {
	p := startPeer(t, tg)
	cn := dialPeer(t, p, Config{Name: "megaphone_test@localhost"})
	n, link, c, self := cn.node, cn.link, cn.in, cn.node.Self()
	send := func(msg etf.Term) { t.Helper(); cn.send(t, msg) }

	send(etf.Tuple{etf.Atom("nodes"), self})
	m := c.waitFor(t, "nodes reply", tagged("nodes")).(etf.Tuple)
	if visible := m[1].(etf.List); len(visible) != 0 {
		t.Errorf("sidecar is visible in nodes(): %v", visible)
	}
	if hidden := m[2].(etf.List); len(hidden) != 1 || hidden[0] != n.Name() {
		t.Errorf("nodes(hidden) = %v, want [%s]", hidden, n.Name())
	}

	send(etf.Tuple{etf.Atom("ping"), self, n.Name()})
	if m := c.waitFor(t, "ping reply", tagged("ping")).(etf.Tuple); m[1] != etf.Atom("pong") {
		t.Errorf("net_adm:ping answered %v", m[1])
	}

	// Signals Erlang aims at our pid must not cost us the link.
	for _, sig := range []etf.Atom{"link", "unlink", "link", "monitor", "exit", "group_leader"} {
		send(etf.Tuple{sig, self})
	}
	for _, reply := range []etf.Atom{"linked", "unlinked", "linked", "monitored", "exited", "gl"} {
		c.waitFor(t, string(reply), tagged(reply))
	}
	send(etf.Tuple{etf.Atom("echo"), self, []byte("still here ünï")})
	if m := c.waitFor(t, "echo", tagged("echo")).(etf.Tuple); string(m[1].([]byte)) != "still here ünï" {
		t.Errorf("echo %v", m)
	}
	if links, monitors := link.Watchers(); links != 1 || monitors != 1 {
		t.Errorf("watchers: %d links, %d monitors; want 1 and 1", links, monitors)
	}

	const count = 100000
	// Erlang to Go: in order, none lost.
	send(etf.Tuple{etf.Atom("flood"), self, count})
	c.waitFor(t, "flood end", tagged("flooded"))
	c.mu.Lock()
	if c.seqErr != nil || c.seqNext != count {
		t.Fatalf("Erlang to Go: %d of %d in order (%v)", c.seqNext, count, c.seqErr)
	}
	c.mu.Unlock()

	// Go to Erlang: in order, none lost.
	send(etf.Tuple{etf.Atom("count"), self, count})
	for i := 1; i <= count; i++ {
		send(etf.Tuple{etf.Atom("seq"), i})
	}
	if m := c.waitFor(t, "count result", tagged("counted")).(etf.Tuple); m[1] != etf.Atom("ok") {
		t.Fatalf("Erlang counted %v", m[1])
	}
	select {
	case <-link.Done():
		t.Fatalf("link went down: %v", link.Err())
	default:
	}
	sent, received := link.Stats()
	t.Logf("link stats: %d sent, %d received", sent, received)
	p.checkQuiet(t)
}

func TestWrongCookieIsRefused(t *testing.T) { forEachPeer(t, testWrongCookieIsRefused) }

func testWrongCookieIsRefused(t *testing.T, tg harness.Target) {
	p := startPeer(t, tg)
	n, _ := New(Config{Name: "megaphone_bad@localhost", Cookie: "wrong", Logger: zaptest.NewLogger(t)})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := n.Dial(ctx, p.name, func(*Link, Delivery) {}); err == nil {
		t.Fatal("dial with a wrong cookie succeeded")
	}
}

func TestCookieFileMustBePrivate(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "cookie")
	os.WriteFile(p, []byte("secret\n"), 0o644)
	if _, err := ReadCookieFile(p); err == nil {
		t.Error("world-readable cookie file accepted")
	}
	os.Chmod(p, 0o400)
	if c, err := ReadCookieFile(p); err != nil || c != "secret" {
		t.Errorf("cookie %q, %v", c, err)
	}
}

// Links and monitors made from the Go side: the peer sees our link, the
// unlink (UNLINK_ID on OTP 26+) takes it away without hurting the link, and
// when the peer process dies we get 'EXIT' for the link and 'DOWN' for the
// monitor, as an Erlang process would.
func TestLinksAndMonitorsFromGo(t *testing.T) { forEachPeer(t, testLinksAndMonitorsFromGo) }

func testLinksAndMonitorsFromGo(t *testing.T, tg harness.Target) {
	peer := startPeer(t, tg)
	cn := dialPeer(t, peer, Config{Name: "megaphone_links@localhost"})
	link, c, self := cn.link, cn.in, cn.node.Self()
	send := func(msg etf.Term) { t.Helper(); cn.send(t, msg) }
	// linkedToUs asks the peer whether its process is linked to ours (it
	// has local links of its own, which we leave out).
	linkedToUs := func() bool {
		t.Helper()
		send(etf.Tuple{etf.Atom("links"), self})
		for _, l := range c.waitFor(t, "links", tagged("links")).(etf.Tuple)[1].(etf.List) {
			if l == self {
				return true
			}
		}
		return false
	}
	send(etf.Tuple{etf.Atom("whoami"), self})
	pid := c.waitFor(t, "pid", tagged("pid")).(etf.Tuple)[1].(etf.Pid)

	for round := 0; round < 2; round++ {
		if err := link.LinkTo(pid); err != nil {
			t.Fatal(err)
		}
		if !linkedToUs() {
			t.Fatalf("round %d: peer not linked to us after LinkTo", round)
		}
		if err := link.Unlink(pid); err != nil {
			t.Fatal(err)
		}
		if linkedToUs() {
			t.Fatalf("round %d: peer still linked to us after Unlink", round)
		}
	}

	if err := link.LinkTo(pid); err != nil {
		t.Fatal(err)
	}
	ref, err := link.Monitor(pid)
	if err != nil {
		t.Fatal(err)
	}
	linkedToUs() // both signals have reached the peer before it dies
	send(etf.Tuple{etf.Atom("die"), []byte("bye")})
	exit := c.waitFor(t, "EXIT", tagged("EXIT")).(etf.Tuple)
	if exit[1] != pid || string(exit[2].([]byte)) != "bye" {
		t.Errorf("EXIT %v", exit)
	}
	down := c.waitFor(t, "DOWN", tagged("DOWN")).(etf.Tuple)
	if r, ok := down[1].(etf.Ref); !ok || !r.Equal(ref) || down[3] != pid || string(down[4].([]byte)) != "bye" {
		t.Errorf("DOWN %v (monitor %v)", down, ref)
	}
	select {
	case <-link.Done():
		t.Fatalf("link went down: %v", link.Err())
	default:
	}
	peer.checkQuiet(t)
}

// An idle link survives: the peer runs with a 4 s net_ticktime, we tick
// every second, and after 10 s of silence the link is still up.
func TestIdleLinkTicks(t *testing.T) { forEachPeer(t, testIdleLinkTicks) }

func testIdleLinkTicks(t *testing.T, tg harness.Target) {
	peer := startPeer(t, tg, "-kernel", "net_ticktime", "4")
	cn := dialPeer(t, peer, Config{Name: "megaphone_tick@localhost", TickInterval: time.Second})
	n, link, c := cn.node, cn.link, cn.in
	select {
	case <-link.Done():
		t.Fatalf("idle link dropped: %v", link.Err())
	case <-time.After(10 * time.Second):
	}
	if err := link.RegSend("peer", etf.Tuple{etf.Atom("echo"), n.Self(), []byte("awake")}); err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, "echo after idling", tagged("echo"))
}
