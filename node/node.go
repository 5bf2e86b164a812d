// Package node makes the sidecar a hidden Erlang node: it finds ejabberd's
// node through epmd, runs the distribution handshake, and keeps one link per
// ejabberd node, with ticks, monitors and links handled as Erlang expects.
//
// The distribution layer is written here, not taken from ergo: see
// docs/ARCHITECTURE.md, "Why not ergo", for the properties ergo v1.999.224
// cannot meet through its interfaces.
package node

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// Config describes the sidecar's own node.
type Config struct {
	// Name is the sidecar's node name, e.g. "megaphone@localhost". Its host
	// part must be of the same kind (short or long) as ejabberd's.
	Name string
	// Cookie is the distribution cookie (see ReadCookieFile).
	Cookie string
	// EPMDPort is epmd's port; 0 means DefaultEPMDPort.
	EPMDPort int
	// TickInterval is how often an idle link ticks; 0 means 15 s, which
	// suits Erlang's default net_ticktime of 60 s.
	TickInterval time.Duration
	// WriteTimeout bounds one write to a peer; 0 means 30 s.
	WriteTimeout time.Duration
	// TLS, if set, runs every link over TLS (DistTLSConfig), as to a node
	// started with -proto_dist inet_tls; the epmd lookup stays plain.
	TLS *tls.Config
	// Controller answers the operator's commands from ejabberd's shell;
	// without one they are answered {error, not_supported}.
	Controller Controller
	Logger     *zap.Logger
}

// Node is the sidecar's identity in the distribution.
type Node struct {
	cfg      Config
	name     etf.Atom
	creation uint32
	self     etf.Pid
	log      *zap.Logger
	refs     atomic.Uint64
	// controlSlots holds one token per operator command running.
	controlSlots chan struct{}
	// dial replaces Dial for a node that reaches ejabberd another way (the
	// port carrier, port.go); closed is closed when that way is gone.
	dial   func(ctx context.Context, peer string, handler Handler) (*Link, error)
	closed chan struct{}
}

func (cfg Config) withDefaults() Config {
	if cfg.EPMDPort == 0 {
		cfg.EPMDPort = DefaultEPMDPort
	}
	if cfg.TickInterval == 0 {
		cfg.TickInterval = 15 * time.Second
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return cfg
}

// makeRef returns a reference unique for this run of the node.
func (n *Node) makeRef() etf.Ref {
	id := n.refs.Add(1)
	return etf.Ref{Node: n.name, Creation: n.creation, IDs: []uint32{uint32(id & 0x3ffff), uint32(id >> 18), 0}}
}

// New creates the node. Each sidecar run gets a fresh random creation, so
// Erlang can tell our pids from those of an earlier run with the same name.
func New(cfg Config) (*Node, error) {
	if _, _, ok := splitNodeName(cfg.Name); !ok {
		return nil, fmt.Errorf("node name %q is not of the form name@host", cfg.Name)
	}
	if cfg.Cookie == "" {
		return nil, errors.New("empty cookie")
	}
	cfg = cfg.withDefaults()
	var c [4]byte
	if _, err := rand.Read(c[:]); err != nil {
		return nil, err
	}
	creation := binary.BigEndian.Uint32(c[:])
	if creation < 4 {
		creation += 4 // 0-3 are reserved for old-style creations
	}
	n := &Node{cfg: cfg, name: etf.Atom(cfg.Name), creation: creation, log: cfg.Logger,
		controlSlots: make(chan struct{}, maxConcurrentControls)}
	n.self = etf.Pid{Node: n.name, ID: 1, Creation: creation}
	return n, nil
}

// Name returns the node's name.
func (n *Node) Name() etf.Atom { return n.name }

// Self returns the pid of the sidecar's one Erlang-visible process: the
// shim sends every reply there and monitors it.
func (n *Node) Self() etf.Pid { return n.self }

// dialPeer opens a link to peer the node's way: the distribution, or the
// port it was started on.
func (n *Node) dialPeer(ctx context.Context, peer string, handler Handler) (*Link, error) {
	if n.dial != nil {
		return n.dial(ctx, peer, handler)
	}
	return n.Dial(ctx, peer, handler)
}

// Closed is closed when a node started on a port has lost it (ejabberd
// closed the port or went away): the sidecar has nothing left to serve.
// For a distribution node it is never closed.
func (n *Node) Closed() <-chan struct{} { return n.closed }

// Dial connects to the Erlang node peer ("name@host") and returns a live
// link whose incoming messages go to handler.
func (n *Node) Dial(ctx context.Context, peer string, handler Handler) (*Link, error) {
	name, host, ok := splitNodeName(peer)
	if !ok {
		return nil, fmt.Errorf("node name %q is not of the form name@host", peer)
	}
	port, err := lookupPort(ctx, host, n.cfg.EPMDPort, name)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", peer, err)
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	headerBytes := 2
	if n.cfg.TLS != nil {
		headerBytes = 4
		cfg := n.cfg.TLS.Clone()
		if cfg.ServerName == "" {
			cfg.ServerName = host
		}
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("TLS with %s: %w", peer, err)
		}
		conn = tc
	}
	info, reader, err := clientHandshake(conn, headerBytes, n.cfg.Name, n.cfg.Cookie, n.creation)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("handshake with %s: %w", peer, err)
	}
	_ = conn.SetDeadline(time.Time{})
	l := n.newLink(conn, reader, info, handler)
	l.start()
	return l, nil
}

func splitNodeName(s string) (name, host string, ok bool) {
	name, host, ok = strings.Cut(s, "@")
	return name, host, ok && name != "" && host != "" && !strings.Contains(host, "@")
}
