package node

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/test/harness"
	"go.uber.org/zap/zaptest"
)

// A link paused in the middle of a flood from a real Erlang node carries
// on in another Node (the same identity, the same socket): every message
// arrives once and in order across the two; the peer process, linked to
// our pid (it would die of noconnection if the connection dropped), is
// alive after the move and answers; and the first node, relaying through
// the second, can still send.
func TestLinkMovesToAnotherNode(t *testing.T) { forEachPeer(t, testLinkMovesToAnotherNode) }

func testLinkMovesToAnotherNode(t *testing.T, tg harness.Target) {
	p := startPeer(t, tg)
	old, reached, gate := dialGated(t, p, Config{Name: "megaphone_handoff@localhost"}, 1000)
	self := old.node.Self()
	old.send(t, etf.Tuple{etf.Atom("link"), self})
	old.in.waitFor(t, "linked", tagged("linked"))

	const count = 200000
	old.send(t, etf.Tuple{etf.Atom("flood"), self, count})
	<-reached // the reader waits inside the flood
	paused := make(chan error, 1)
	var st LinkHandoff
	go func() {
		var err error
		st, err = old.link.pause()
		paused <- err
	}()
	// The reader is to find the pause asked for at its next frame, with
	// frames of the flood still in its buffer, which move with the link.
	for deadline := time.Now().Add(5 * time.Second); !old.link.pausing.Load() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	close(gate)
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	old.in.mu.Lock()
	seen := old.in.seqNext
	old.in.mu.Unlock()
	if seen == count || len(st.Unread) == 0 {
		t.Errorf("paused after %d of %d messages with %d bytes read ahead: the move was not tested under load",
			seen, count, len(st.Unread))
	}
	if len(st.Links) != 1 {
		t.Errorf("the paused link carries %d links, want the peer's one", len(st.Links))
	}

	n, err := Restore(Config{Cookie: p.cookie, Logger: zaptest.NewLogger(t)}, old.node.Identity())
	if err != nil {
		t.Fatal(err)
	}
	if n.Self() != self {
		t.Fatalf("restored pid %v, want %v", n.Self(), self)
	}
	in := newCollector()
	in.seqNext = seen
	moved := n.adoptLink(dupConn(t, old.link.conn), st, in.handle)
	moved.start()
	t.Cleanup(moved.Close)
	in.waitFor(t, "flood end", tagged("flooded"))
	in.mu.Lock()
	if in.seqErr != nil || in.seqNext != count {
		t.Errorf("across the move: %d of %d in order (%v)", in.seqNext, count, in.seqErr)
	}
	in.mu.Unlock()

	// The old link writes through the new one from now on.
	old.link.relayThrough(moved.writeRelayedFrame)
	old.send(t, etf.Tuple{etf.Atom("echo"), self, []byte("through the relay")})
	if m := in.waitFor(t, "echo", tagged("echo")).(etf.Tuple); string(m[1].([]byte)) != "through the relay" {
		t.Errorf("echo %v", m)
	}
	if links, _ := moved.Watchers(); links != 1 {
		t.Errorf("the moved link knows %d links, want 1", links)
	}
	p.checkQuiet(t)
}

// A pause that the takeover gives up on resumes the link where it stopped.
func TestPausedLinkResumes(t *testing.T) { forEachPeer(t, testPausedLinkResumes) }

func testPausedLinkResumes(t *testing.T, tg harness.Target) {
	p := startPeer(t, tg)
	cn, reached, gate := dialGated(t, p, Config{Name: "megaphone_resume@localhost"}, 1000)
	const count = 100000
	cn.send(t, etf.Tuple{etf.Atom("flood"), cn.node.Self(), count})
	<-reached
	paused := make(chan error, 1)
	go func() {
		_, err := cn.link.pause()
		paused <- err
	}()
	close(gate)
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	cn.link.resume()
	cn.in.waitFor(t, "flood end", tagged("flooded"))
	cn.in.mu.Lock()
	if cn.in.seqErr != nil || cn.in.seqNext != count {
		t.Errorf("across the pause: %d of %d in order (%v)", cn.in.seqNext, count, cn.in.seqErr)
	}
	cn.in.mu.Unlock()
	cn.send(t, etf.Tuple{etf.Atom("echo"), cn.node.Self(), []byte("after")})
	cn.in.waitFor(t, "echo", tagged("echo"))
}

// waitSeq waits (bounded) until c has taken at least n {seq, I} messages.
func waitSeq(t *testing.T, c *collector, n int64) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		c.mu.Lock()
		got := c.seqNext
		c.mu.Unlock()
		if got >= n {
			return
		}
	}
	t.Fatalf("fewer than %d messages within 20s", n)
}

// A pause that catches the reader inside a frame hands the frame's first
// bytes over with the link: the new reader completes the frame from them
// and the socket. (A fake peer over loopback TCP, writing frames in
// pieces, makes the split certain.)
func TestPauseInsideAFrame(t *testing.T) {
	n, err := New(Config{Name: "megaphone_split@localhost", Cookie: "c", Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	ours, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	frame := func(i int) []byte {
		b := make([]byte, 4, 64)
		b = append(b, passThrough)
		b, _ = etf.AppendEncode(b, etf.Tuple{opSend, etf.Atom(""), n.Self()})
		b, _ = etf.AppendEncode(b, etf.Tuple{etf.Atom("seq"), i})
		binary.BigEndian.PutUint32(b, uint32(len(b)-4))
		return b
	}
	first := newCollector()
	l := n.adoptLink(ours, LinkHandoff{Peer: "peer@localhost", PeerFlags: ourFlags}, first.handle)
	l.start()
	defer l.Close()
	two := frame(2)
	if _, err := peer.Write(append(frame(1), two[:7]...)); err != nil {
		t.Fatal(err)
	}
	waitSeq(t, first, 1)
	time.Sleep(100 * time.Millisecond) // the reader now waits for the rest of frame 2
	st, err := l.pause()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Unread) != 7 {
		t.Fatalf("%d bytes handed over, want the 7 of frame 2 already read", len(st.Unread))
	}
	next := newCollector()
	next.seqNext = 1
	moved := n.adoptLink(dupConn(t, ours), st, next.handle)
	moved.start()
	defer moved.Close()
	if _, err := peer.Write(append(two[7:], frame(3)...)); err != nil {
		t.Fatal(err)
	}
	waitSeq(t, next, 3)
	next.mu.Lock()
	defer next.mu.Unlock()
	if next.seqErr != nil {
		t.Error(next.seqErr)
	}
}

// dupConn gives a socket a new descriptor, as SCM_RIGHTS does.
func dupConn(t *testing.T, c net.Conn) net.Conn {
	t.Helper()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dup, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return dup
}

// dialGated is dialPeer with a reader that, at message {seq, at}, waits
// until gate is closed (reached says it is there): a flood is then surely
// still under way when the test acts.
func dialGated(t *testing.T, p *peerNode, cfg Config, at int64) (cn *connected, reached <-chan struct{}, gate chan struct{}) {
	t.Helper()
	here, gate := make(chan struct{}), make(chan struct{})
	cn = dialPeerVia(t, p, cfg, func(next Handler) Handler {
		return func(l *Link, d Delivery) {
			if m, ok := d.Msg.(etf.Tuple); ok && len(m) == 2 && m[0] == etf.Atom("seq") && m[1] == at {
				close(here)
				<-gate
			}
			next(l, d)
		}
	})
	return cn, here, gate
}
