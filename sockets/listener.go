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
	"time"

	"go.uber.org/zap"
)

// Listener accepts client connections, registers each (which gives it an
// ID), and refuses those over the registry's limits by closing them at
// once: nothing of theirs is read.
type Listener struct {
	net.Listener
	registry *Registry
	log      *zap.Logger
	// streams says each connection is a new XMPP stream (not HTTP), to be
	// refused while the sidecar drains.
	streams bool
}

// Listen opens a TCP listener on addr for HTTP (BOSH, WebSocket) whose
// connections join registry.
func Listen(addr string, registry *Registry, log *zap.Logger) (*Listener, error) {
	return listen(addr, registry, log, false)
}

// ListenStreams opens a TCP listener on addr for XMPP streams: while the
// registry drains, it refuses new connections.
func ListenStreams(addr string, registry *Registry, log *zap.Logger) (*Listener, error) {
	return listen(addr, registry, log, true)
}

func listen(addr string, registry *Registry, log *zap.Logger, streams bool) (*Listener, error) {
	return ListenConfig{}.listen(addr, registry, log, streams)
}

// Accept waits for the next connection that fits the limits.
func (l *Listener) Accept() (net.Conn, error) {
	backoff := time.Duration(0)
	for {
		raw, err := l.Listener.Accept()
		if err != nil && retryableAccept(err) {
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			if backoff == acceptBackoffMax || backoff == acceptBackoffMin {
				l.log.Warn("accept failed; retrying", zap.Error(err), zap.Duration("backoff", backoff))
			}
			time.Sleep(backoff)
			continue
		}
		if err != nil {
			return nil, err
		}
		backoff = 0
		c, reason := l.registry.admit(raw, l.streams)
		if c == nil {
			l.log.Debug("connection refused", zap.Stringer("peer", raw.RemoteAddr()), zap.String("reason", reason))
			_ = raw.Close()
			continue
		}
		return c, nil
	}
}

// Conn is an accepted client connection. It counts the bytes that cross
// it (what the operator's connection list shows) and carries what the
// layers above learn about it: its transport, the JID bound on it, the
// BOSH session it last served.
type Conn struct {
	net.Conn
	ID       uint64
	Peer     netip.AddrPort
	Opened   time.Time
	registry *Registry
	once     sync.Once

	bytesIn, bytesOut atomic.Uint64
	// poll is the stream's non-blocking side, whose socket may wait in the
	// poller (poller.go); nil for HTTP and WebSocket connections.
	poll atomic.Pointer[pollingConn]

	mu        sync.Mutex
	transport string
	jid       string
	boshSID   string
	session   string            // ejabberd's side: the c2s pid or the BOSH sid
	end       func(cond string) // ends an XMPP stream with a stream error
	mover     streamMover       // pauses the stream for a takeover (handoff.go)
	recorder  *wsTap            // keeps a WebSocket's unread bytes for a takeover

	// unread is what a reader took from the socket but did not use, to be
	// read again first (Unread). Set only between two readers.
	unread []byte
}

// Unread makes the next reads return b before the socket's bytes: what a
// reader of the connection took but did not use, handed to the next one
// (a BOSH long-poll parked without its HTTP reader, bosh/edgepark.go).
// Only call it while nothing reads the connection.
func (c *Conn) Unread(b []byte) { c.unread = append(b[:len(b):len(b)], c.unread...) }

// Read counts what the client sent.
func (c *Conn) Read(b []byte) (int, error) {
	if len(c.unread) > 0 {
		n := copy(b, c.unread)
		if c.unread = c.unread[n:]; len(c.unread) == 0 {
			c.unread = nil
		}
		return n, nil // counted when it was first read
	}
	n, err := c.Conn.Read(b)
	c.bytesIn.Add(uint64(n))
	if c.recorder != nil {
		c.recorder.record(b[:n]) // a WebSocket that may move (wshandoff.go)
	}
	return n, err
}

// Write counts what the client was sent.
func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.bytesOut.Add(uint64(n))
	return n, err
}

// Close closes the connection and frees its place in the registry. A
// socket waiting in the poller leaves it first (its descriptor number may
// be reused as soon as it is closed), and the stream gets a reader that
// sees it closed.
func (c *Conn) Close() error {
	if p := c.poll.Load(); p != nil {
		p.leave()
	}
	err := c.Conn.Close()
	c.once.Do(func() { c.registry.release(c) })
	return err
}

// wakeReader gives a stream whose socket waits in the poller a reader
// now, without waiting for input (a takeover stops streams through their
// reader).
func (c *Conn) wakeReader() {
	if p := c.poll.Load(); p != nil {
		p.unpark()
	}
}

// Limits returns the limits in force for the connection's registry.
func (c *Conn) Limits() Limits { return c.registry.Limits() }

// NewStreamID hands out an ID from the sequence connection IDs come from,
// for a stream that outlives the connection it began on (a BOSH session
// served at the edge spans many HTTP connections): it never equals a
// connection's ID, so the two cannot be mixed up on the bridge.
func (c *Conn) NewStreamID() uint64 { return c.registry.lastID.Add(1) }

// SetTransport names the protocol the connection speaks: tcp, tls,
// websocket or bosh.
func (c *Conn) SetTransport(t string) {
	c.mu.Lock()
	c.transport = t
	c.mu.Unlock()
}

// SetJID records the JID ejabberd bound on the connection.
func (c *Conn) SetJID(jid string) {
	c.mu.Lock()
	c.jid = jid
	c.mu.Unlock()
}

// JID returns the JID bound on the connection, or "".
func (c *Conn) JID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.jid
}

// SetSession records ejabberd's end of the connection (a c2s pid, or the
// sid of the BOSH session the connection last carried).
func (c *Conn) SetSession(s string) {
	c.mu.Lock()
	c.session = s
	c.mu.Unlock()
}

// OnEnd sets how the sidecar ends this connection on its own account (an
// operator's kick, the end of a drain): XMPP streams send a stream error
// with the given condition, then close. Without it the socket is closed.
func (c *Conn) OnEnd(end func(cond string)) {
	c.mu.Lock()
	c.end = end
	c.mu.Unlock()
}

// End ends the connection with a stream error condition (see OnEnd).
func (c *Conn) End(cond string) {
	c.mu.Lock()
	end := c.end
	c.mu.Unlock()
	if end != nil {
		end(cond)
		return
	}
	_ = c.Close()
}

// Info is a snapshot of the connection.
func (c *Conn) Info() ConnInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return ConnInfo{ID: c.ID, Transport: c.transport, Peer: c.Peer, Opened: c.Opened,
		BytesIn: c.bytesIn.Load(), BytesOut: c.bytesOut.Load(), JID: c.jid, Session: c.session}
}

// ConnInfo is what the operator sees of one connection.
type ConnInfo struct {
	ID                uint64
	Transport         string
	Peer              netip.AddrPort
	Opened            time.Time
	BytesIn, BytesOut uint64
	JID               string
	Session           string
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
