package node

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/etf"
)

// The port carrier: the same bridge protocol for sites that want no
// distribution link. The shim starts the sidecar itself as an Erlang port
// (megaphone:start_port/2: {packet, 4}, binary, on the sidecar's stdin and
// stdout), and its port process, megaphone_port, stands in for the
// sidecar's node: it sends us {megaphone_port, OwnerPid, NodeName} first,
// then carries distribution frames (pass-through byte 112, control
// message, payload) both ways, acting on SEND, REG_SEND and MONITOR_P for
// us and sending us what ejabberd's processes send to it. So everything
// above the link (Attachment, streams, commands) is the same in both
// modes; our one process is the port process, and c2s monitors it as it
// would our pid.

// ErrPortClosed means the port the node was started on is gone.
var ErrPortClosed = errors.New("the port to ejabberd is closed")

// portHelloTimeout bounds the wait for the port process's greeting.
const portHelloTimeout = 10 * time.Second

// NewPortNode makes the sidecar's node on the port conn (see StdioConn):
// it reads the port process's greeting and returns the node and the name
// of the ejabberd node behind the port. cfg.Name names the sidecar in its
// hello; no cookie is needed.
func NewPortNode(cfg Config, conn net.Conn) (*Node, string, error) {
	cfg = cfg.withDefaults()
	reader := bufio.NewReaderSize(conn, 64<<10)
	_ = conn.SetReadDeadline(time.Now().Add(portHelloTimeout))
	owner, peer, err := readPortHello(reader)
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil {
		return nil, "", err
	}
	// Our one process is the port process, and our references are made in
	// its node's name (an atom that exists there), so nothing we send
	// makes the shim create an atom.
	n := &Node{cfg: cfg, name: etf.Atom(peer), creation: owner.Creation, self: owner, log: cfg.Logger,
		controlSlots: make(chan struct{}, maxConcurrentControls), closed: make(chan struct{})}
	link := n.newLink(conn, reader, peerInfo{name: peer, flags: ourFlags, creation: owner.Creation}, nil)
	var once sync.Once
	n.dial = func(ctx context.Context, _ string, handler Handler) (*Link, error) {
		dialed := false
		once.Do(func() {
			link.handler = handler
			link.start()
			go func() { <-link.Done(); close(n.closed) }()
			dialed = true
		})
		if !dialed {
			return nil, ErrPortClosed
		}
		return link, nil
	}
	return n, peer, nil
}

// readPortHello reads {megaphone_port, OwnerPid, NodeName}, one packet.
func readPortHello(r io.Reader) (etf.Pid, string, error) {
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return etf.Pid{}, "", fmt.Errorf("reading the port greeting: %w", err)
	}
	size := binary.BigEndian.Uint32(head[:])
	if size == 0 || size > 4096 {
		return etf.Pid{}, "", fmt.Errorf("port greeting of %d bytes", size)
	}
	packet := make([]byte, size)
	if _, err := io.ReadFull(r, packet); err != nil {
		return etf.Pid{}, "", fmt.Errorf("reading the port greeting: %w", err)
	}
	t, _, err := etf.Decode(packet)
	if err != nil {
		return etf.Pid{}, "", fmt.Errorf("port greeting: %w", err)
	}
	hello, ok := t.(etf.Tuple)
	if !ok || len(hello) != 3 || hello[0] != etf.Atom("megaphone_port") {
		return etf.Pid{}, "", errors.New("the port did not greet us as megaphone_port: is this binary started by megaphone:start_port/2?")
	}
	owner, ok1 := hello[1].(etf.Pid)
	peer, ok2 := hello[2].(etf.Atom)
	if !ok1 || !ok2 {
		return etf.Pid{}, "", errors.New("malformed port greeting")
	}
	return owner, string(peer), nil
}

// StdioConn is the process's stdin and stdout as one connection, the way
// an Erlang port talks to its program. Both are made non-blocking first,
// so that deadlines work on them and a close wakes a blocked read.
func StdioConn() (net.Conn, error) {
	for _, fd := range []int{0, 1} {
		if err := syscall.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("port: %w", err)
		}
	}
	return &pipeConn{in: os.NewFile(0, "port-in"), out: os.NewFile(1, "port-out")}, nil
}

// pipeConn joins two pipes into a net.Conn.
type pipeConn struct{ in, out *os.File }

func (p *pipeConn) Read(b []byte) (int, error)  { return p.in.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error) { return p.out.Write(b) }
func (p *pipeConn) Close() error                { return errors.Join(p.in.Close(), p.out.Close()) }
func (p *pipeConn) LocalAddr() net.Addr         { return portAddr{} }
func (p *pipeConn) RemoteAddr() net.Addr        { return portAddr{} }
func (p *pipeConn) SetDeadline(t time.Time) error {
	return errors.Join(p.in.SetReadDeadline(t), p.out.SetWriteDeadline(t))
}
func (p *pipeConn) SetReadDeadline(t time.Time) error  { return p.in.SetReadDeadline(t) }
func (p *pipeConn) SetWriteDeadline(t time.Time) error { return p.out.SetWriteDeadline(t) }

type portAddr struct{}

func (portAddr) Network() string { return "erlang-port" }
func (portAddr) String() string  { return "stdio" }
