package sockets

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// StreamSink receives what ejabberd writes to one client stream; its
// methods must not block.
type StreamSink interface {
	Write(ev etf.Term)
	Close(reason string)
	Abort(condition string)
	Shape(bytesPerSec int64)
}

// Stream is ejabberd's side of one client stream (a c2s process).
type Stream interface {
	Send(events []etf.Term) error
	Close()
	MaxStanzaBytes() int64
	// Describe names ejabberd's end of the stream (its c2s pid), for the
	// operator's connection list.
	Describe() string
}

// StreamBackend starts ejabberd_c2s for a client stream.
type StreamBackend interface {
	OpenStream(ctx context.Context, open etf.C2SOpen, sink StreamSink) (Stream, error)
}

// C2SConfig tunes the XMPP client listeners.
type C2SConfig struct {
	// TLS, if set, is used for direct TLS (XEP-0368) and makes STARTTLS
	// required on plain listeners: with a certificate at hand, the sidecar
	// never lets credentials cross the wire in clear.
	TLS *tls.Config
	// HandshakeTimeout bounds everything before c2s runs: the stream
	// header, STARTTLS, the TLS handshake. 0 means 30 s.
	HandshakeTimeout time.Duration
	// MaxPendingWrite bounds what may wait to be written to one client; a
	// client that reads slower than that is disconnected. 0 means 1 MiB.
	MaxPendingWrite int
	Logger          *zap.Logger
}

// XML namespaces the pre-TLS negotiation speaks.
const (
	nsStreams = "urn:ietf:params:xml:ns:xmpp-streams"
	nsTLS     = "urn:ietf:params:xml:ns:xmpp-tls"
)

// ServeC2S accepts XMPP client connections on lis until it is closed.
// directTLS makes every connection start with a TLS handshake (port 5223);
// otherwise STARTTLS is required when cfg.TLS is set, and the stream is
// plain when it is not.
func ServeC2S(lis *Listener, cfg C2SConfig, backend StreamBackend, directTLS bool) error {
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.MaxPendingWrite <= 0 {
		cfg.MaxPendingWrite = 1 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if directTLS && cfg.TLS == nil {
		return errors.New("direct TLS needs a certificate")
	}
	// The poller's descriptor and goroutine come with the listener, not
	// with its first idle stream: they are part of the process's baseline.
	// Without one, streams wait the way they did before it (waitReadable).
	_, _ = idlePoller()
	for {
		c, err := lis.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		conn := c.(*Conn)
		go serveC2SConn(conn, &cfg, backend, directTLS)
	}
}

// c2sConn is one client stream: the socket, its reader (framer), and the queue of
// what ejabberd writes to it.
type c2sConn struct {
	conn net.Conn // the client socket (a pollingConn where it can be, TLS-wrapped once negotiated)
	raw  *Conn
	cfg  *C2SConfig // the listener's, shared by its streams
	// log is the listener's logger, shared: a child logger per connection
	// (Logger.With) costs ~1.4 KiB each, so call sites add connField.
	log *zap.Logger

	out *outbox

	mu         sync.Mutex // guards conn and headerSent
	headerSent bool
	shaper     shaper

	r       *streamReader // the stream's reader once it is past TLS; its framer holds a takeover's unread bytes
	stream  Stream        // c2s, once the stream is open
	handoff streamHandoff
}

func serveC2SConn(raw *Conn, cfg *C2SConfig, backend StreamBackend, directTLS bool) {
	c := &c2sConn{conn: clientSocket(raw), raw: raw, cfg: cfg, log: cfg.Logger}
	raw.SetTransport("tcp")
	raw.OnEnd(c.streamErrorCondition)
	c.out = newOutbox(cfg.MaxPendingWrite, c)
	stream, r := c.open(backend, directTLS)
	if stream == nil {
		c.out.shutdown()
		_ = raw.Close()
		return
	}
	c.stream = stream
	r.parkWhenIdle(c)
	// The open stream is read on a goroutine of its own, started from a
	// shallow frame: the deep stack of the TLS handshake and the opening
	// ends with this one. That reader, and every one after it, ends once
	// the stream is idle; the poller starts the next (poller.go).
	go c.run()
}

// open takes a new connection through TLS and the stream header to a
// running c2s, or ends it with the reason; it returns nil then.
func (c *c2sConn) open(backend StreamBackend, directTLS bool) (Stream, *streamReader) {
	raw, cfg := c.raw, c.cfg
	_ = raw.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	transport := "tcp"
	switch {
	case directTLS:
		tc := tls.Server(c.conn, cfg.TLS)
		if err := tc.Handshake(); err != nil {
			raw.registry.countHandshakeFailure("tls")
			c.log.Debug("TLS handshake failed", c.connField(), zap.Error(err))
			return nil, nil
		}
		c.setConn(tc)
		transport = "tls"
		raw.SetTransport(transport)
	case cfg.TLS != nil:
		tc, err := c.startTLS()
		if err != nil {
			c.log.Debug("STARTTLS failed", c.connField(), zap.Error(err))
			return nil, nil
		}
		c.setConn(tc)
		transport = "tls"
		raw.SetTransport(transport)
	}

	r := c.reader(transport, xmlstream.Limits{MaxStanzaBytes: raw.registry.Limits().MaxStanzaBytes})
	header, err := r.next()
	if err != nil {
		c.streamError(err)
		r.release()
		return nil, nil
	}
	local := addrPort(raw.LocalAddr())
	ctx, cancel := context.WithTimeout(context.Background(), cfg.HandshakeTimeout)
	stream, err := backend.OpenStream(ctx, etf.C2SOpen{ConnID: raw.ID, Transport: transport, Peer: raw.Peer, Local: local}, c)
	cancel()
	if err != nil {
		c.log.Info("ejabberd did not take the stream", c.connField(), zap.Error(err))
		c.streamErrorCondition("remote-connection-failed")
		r.release()
		return nil, nil
	}
	raw.SetSession(stream.Describe())
	r.framer.SetMaxStanzaBytes(stanzaLimit(raw.Limits().MaxStanzaBytes, stream.MaxStanzaBytes()))
	_ = raw.SetDeadline(time.Time{}) // c2s keeps its own timers from here
	if err := stream.Send([]etf.Term{header}); err != nil {
		stream.Close()
		r.release()
		return nil, nil
	}
	return stream, r
}

// run reads an open stream until it ends or moves, then lets go of it;
// or until it is idle: it then waits in the poller, which calls readOn
// once there is input.
func (c *c2sConn) run() {
	if c.readStanzas() {
		return // parked: the stream is the next reader's now
	}
	c.stream.Close()
	c.r.release()
	c.out.shutdown()
	_ = c.raw.Close()
}

// readOn runs the stream's next reader, on a goroutine of its own
// (parkedReader).
func (c *c2sConn) readOn() { c.run() }

// readStanzas hands the client's stanzas to c2s until the stream ends, it
// moves to a new sidecar process (handoff.go), or it parks; it reports
// whether it parked.
func (c *c2sConn) readStanzas() (parked bool) {
	for {
		err := c.pumpStanzas()
		switch {
		case errors.Is(err, errParked):
			return true
		case err == nil:
			return false
		case c.handoff.requested.Load():
			if c.park() {
				return false // the stream has moved
			}
		case !errors.Is(err, io.EOF) && !c.out.isClosing():
			c.streamError(err)
			return false
		default:
			return false
		}
	}
}

// pumpStanzas returns the read error that stopped it (errParked: the
// stream is idle), or nil once it has ended the stream itself.
func (c *c2sConn) pumpStanzas() error {
	c.handoff.opened(c.stream.MaxStanzaBytes())
	for {
		ev, err := c.r.next()
		if err != nil {
			return err
		}
		if err := c.stream.Send([]etf.Term{ev}); err != nil {
			c.streamErrorCondition("remote-connection-failed")
			return nil
		}
	}
}

// startTLS answers the pre-TLS stream itself: ejabberd never sees a byte
// before encryption (it cannot do TLS on a virtual socket anyway).
func (c *c2sConn) startTLS() (*tls.Conn, error) {
	// Bytes after <starttls/> would be the client's ClientHello, which it
	// may send only once it has <proceed/>, so nothing read here is lost.
	r := newStreamReader(c.conn, xmlstream.Limits{MaxStanzaBytes: 4096, MaxDepth: 4})
	defer r.release()
	header, err := r.next()
	if err != nil {
		c.streamError(err)
		return nil, err
	}
	to := xmlstream.Attr(header, "to")
	err = c.writeNow([]byte(fmt.Sprintf("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "+
		"xmlns:stream='http://etherx.jabber.org/streams' id='%s' from='%s' version='1.0'>"+
		"<stream:features><starttls xmlns='%s'><required/></starttls></stream:features>",
		randomID(), xmlstream.EscapeAttr(to), nsTLS)))
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.headerSent = true
	c.mu.Unlock()
	el, err := r.next()
	if err != nil {
		c.streamError(err)
		return nil, err
	}
	r.release() // the handshake reads the blocking way
	if xmlstream.Name(el) != "starttls" || xmlstream.Attr(el, "xmlns") != nsTLS {
		c.streamErrorCondition("policy-violation")
		return nil, fmt.Errorf("client sent <%s> where STARTTLS is required", xmlstream.Name(el))
	}
	// <proceed/> must reach the client before the handshake starts.
	if err := c.writeNow([]byte("<proceed xmlns='" + nsTLS + "'/>")); err != nil {
		return nil, err
	}
	tc := tls.Server(c.conn, c.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		c.raw.registry.countHandshakeFailure("starttls")
		return nil, err
	}
	c.mu.Lock()
	c.headerSent = false // the client opens a fresh stream over TLS
	c.mu.Unlock()
	return tc, nil
}

// Write queues one event from c2s for the client (StreamSink).
func (c *c2sConn) Write(ev etf.Term) {
	b, err := xmlstream.AppendEvent(nil, ev)
	if err != nil {
		c.log.Warn("unwritable event from ejabberd; closing", c.connField(), zap.Error(err))
		c.Close("bad event")
		return
	}
	if t, ok := ev.(etf.Tuple); ok && len(t) > 0 && t[0] == etf.Atom("xmlstreamstart") {
		c.mu.Lock()
		c.headerSent = true
		c.mu.Unlock()
	}
	learnJID(c.raw, ev)
	c.out.push(b)
}

// stanzaLimit is the tighter of the sidecar's own limit (the operator's,
// megaphone:limits/1) and ejabberd's max_stanza_size; 0 means none.
func stanzaLimit(ours, ejabberds int64) int64 {
	switch {
	case ours <= 0:
		return ejabberds
	case ejabberds <= 0:
		return ours
	}
	return min(ours, ejabberds)
}

// learnJID records the JID ejabberd binds on a stream, for the operator's
// connection list; once it is known, nothing is looked at.
func learnJID(conn *Conn, ev etf.Term) {
	if conn.JID() != "" {
		return
	}
	if jid := xmlstream.BoundJID(ev); jid != "" {
		conn.SetJID(jid)
	}
}

// Close ends the connection once what is queued is written (StreamSink).
func (c *c2sConn) Close(reason string) { c.out.close() }

// Abort ends the stream with a stream error: ejabberd is out of reach
// (StreamSink).
func (c *c2sConn) Abort(condition string) { c.streamErrorCondition(condition) }

// Shape applies ejabberd's c2s shaper to what the client sends (StreamSink).
func (c *c2sConn) Shape(bytesPerSec int64) { c.shaper.setRate(bytesPerSec) }

// writeNow writes synchronously (the STARTTLS step, before the writer
// matters); whatever is queued goes first.
func (c *c2sConn) writeNow(b []byte) error {
	for _, m := range c.out.drain() {
		if _, err := c.raw.Write(m); err != nil {
			return err
		}
	}
	_, err := c.raw.Write(b)
	return err
}

// overflow disconnects a client that reads slower than ejabberd writes.
func (c *c2sConn) overflow() {
	c.log.Info("client reads too slowly; disconnecting", c.connField(), zap.Int("limit", c.cfg.MaxPendingWrite))
	_ = c.raw.Close()
}

// connField names the connection in a log line.
func (c *c2sConn) connField() zap.Field { return zap.Uint64("conn", c.raw.ID) }

func (c *c2sConn) setConn(conn net.Conn) {
	c.mu.Lock()
	c.conn = conn
	c.mu.Unlock()
}

// write sends one queued message to the client (the outbox's writer).
func (c *c2sConn) write(b []byte) error {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	_ = conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := conn.Write(b)
	return err
}

func (c *c2sConn) closeConn() {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	_ = conn.Close()
}

// streamError reports a parse failure to the client as a stream error;
// network errors just end the connection.
func (c *c2sConn) streamError(err error) {
	if cond := conditionOf(err); cond != "" {
		c.log.Info("bad client stream", c.connField(), zap.Error(err))
		c.streamErrorCondition(cond)
	}
}

var errBinaryMessage = errors.New("binary WebSocket message")

// conditionOf names the stream error (RFC 6120 §4.9.3) for a parse
// failure or a client that stalled while the stream opened (the handshake
// deadline), or "" for a failure that is no fault of the client's.
func conditionOf(err error) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "connection-timeout"
	}
	for _, cond := range []error{xmlstream.ErrNotWellFormed, xmlstream.ErrRestrictedXML, xmlstream.ErrPolicyViolation} {
		if errors.Is(err, cond) {
			return cond.Error()
		}
	}
	return ""
}

func (c *c2sConn) streamErrorCondition(cond string) {
	c.raw.registry.countStreamError(cond)
	c.mu.Lock()
	header := !c.headerSent
	c.headerSent = true
	c.mu.Unlock()
	var b []byte
	if header {
		b = append(b, "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"...)
	}
	b = append(b, "<stream:error><"+cond+" xmlns='"+nsStreams+"'/></stream:error></stream:stream>"...)
	c.out.push(b)
	c.out.close()
}

func randomID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
