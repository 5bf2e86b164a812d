// Package sockets owns the sidecar's client sockets: listeners, the
// connection registry, connection IDs, and the limits that apply before a
// byte of client data goes anywhere.
package sockets

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
)

// IDs hands out connection IDs: 64-bit, unique for one run of the sidecar,
// shared by every listener so that an ID names one connection, whatever its
// kind. Together with the sidecar's pid (fresh each run) an ID is unique for
// ejabberd too.
type IDs struct{ last atomic.Uint64 }

// Next returns a new connection ID; IDs start at 1.
func (s *IDs) Next() uint64 { return s.last.Add(1) }

// Limits bound what one listener accepts. Zero means no limit.
type Limits struct {
	MaxConns      int // open connections in all
	MaxConnsPerIP int // open connections from one source address
}

// Stats counts a listener's connections.
type Stats struct {
	Open     int
	Accepted uint64
	Refused  uint64
}

// Listener accepts client connections, gives each an ID, and refuses those
// over the limits by closing them at once: nothing of theirs is read.
type Listener struct {
	net.Listener
	ids    *IDs
	limits Limits
	log    *zap.Logger

	mu       sync.Mutex
	open     int
	perIP    map[netip.Addr]int
	accepted uint64
	refused  uint64
}

// Listen opens a TCP listener on addr.
func Listen(addr string, ids *IDs, limits Limits, log *zap.Logger) (*Listener, error) {
	inner, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Listener{Listener: inner, ids: ids, limits: limits, log: log, perIP: make(map[netip.Addr]int)}, nil
}

// Accept waits for the next connection that fits the limits.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		raw, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		peer := addrPort(raw.RemoteAddr())
		if reason := l.admit(peer.Addr()); reason != "" {
			l.log.Debug("connection refused", zap.Stringer("peer", peer), zap.String("reason", reason))
			_ = raw.Close()
			continue
		}
		return &Conn{Conn: raw, ID: l.ids.Next(), Peer: peer, owner: l}, nil
	}
}

func (l *Listener) admit(ip netip.Addr) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.limits.MaxConns > 0 && l.open >= l.limits.MaxConns:
		l.refused++
		return "max connections"
	case l.limits.MaxConnsPerIP > 0 && l.perIP[ip] >= l.limits.MaxConnsPerIP:
		l.refused++
		return "max connections per IP"
	}
	l.open++
	l.perIP[ip]++
	l.accepted++
	return ""
}

func (l *Listener) release(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if l.perIP[ip]--; l.perIP[ip] <= 0 {
		delete(l.perIP, ip)
	}
}

// Stats returns the listener's counts.
func (l *Listener) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{Open: l.open, Accepted: l.accepted, Refused: l.refused}
}

// Conn is an accepted client connection.
type Conn struct {
	net.Conn
	ID    uint64
	Peer  netip.AddrPort
	owner *Listener
	once  sync.Once
}

// Close closes the connection and frees its place in the limits.
func (c *Conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.owner.release(c.Peer.Addr()) })
	return err
}

type connKey struct{}

// WithConn returns a context that carries the connection a request came
// on; give it to http.Server's ConnContext.
func WithConn(ctx context.Context, c net.Conn) context.Context {
	if sc, ok := c.(*Conn); ok {
		return context.WithValue(ctx, connKey{}, sc)
	}
	return ctx
}

// ConnFrom returns the connection a request came on.
func ConnFrom(ctx context.Context) (*Conn, error) {
	if c, ok := ctx.Value(connKey{}).(*Conn); ok {
		return c, nil
	}
	return nil, errors.New("request did not come through a sockets.Listener")
}

func addrPort(a net.Addr) netip.AddrPort {
	if tcp, ok := a.(*net.TCPAddr); ok {
		return tcp.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
