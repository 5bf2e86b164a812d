package sockets

// Hot upgrade: plain XMPP streams move to a new sidecar process with their
// socket (SCM_RIGHTS, done by the caller) and the little state a stream
// has between two stanzas. The reader stops at a stanza boundary: the
// bytes it had read past the last whole stanza travel with the socket, and
// the new process parses them first. The writer stops after the message it
// is writing; what it had not written travels too. TLS streams do not
// move (Go cannot export a live TLS session); they stay in the old process
// until they end (see docs/ARCHITECTURE.md, "Hot upgrade").

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// StreamState is one client stream in flight between two processes
// (serialised with msgpack by the caller).
type StreamState struct {
	ConnID    uint64
	Transport string
	Peer      string
	Opened    time.Time
	BytesIn   uint64
	BytesOut  uint64
	JID       string
	Session   string
	// Unread is what the client sent after its last whole stanza.
	Unread []byte
	// Unwritten is what ejabberd wrote that the client has not been sent.
	Unwritten  [][]byte
	HeaderSent bool
	ShaperRate int64
	MaxStanza  int64
}

// streamMover is a stream that can stop for a takeover.
type streamMover interface {
	pauseForHandoff(deadline time.Time) (*MovingStream, error)
}

// streamHandoff is a stream's side of a takeover.
type streamHandoff struct {
	running   atomic.Bool  // the reader feeds c2s (the stream is open)
	maxStanza atomic.Int64 // ejabberd's stanza limit for the stream
	requested atomic.Bool
	parked    chan struct{} // closed by the reader once it stopped
	decision  chan bool     // true: the stream moved; false: read on here
}

// MovingStream is a stream paused for a takeover: its reader waits at a
// stanza (or message) boundary until Moved or Resume.
type MovingStream struct {
	State StreamState

	conn      *Conn
	out       *outbox
	decide    chan<- bool
	afterStop func(*StreamState) // what the writer's side adds to the state
}

// Socket returns the client's socket, to be sent with SCM_RIGHTS. It
// stays open until Moved or Resume.
func (m *MovingStream) Socket() net.Conn { return m.conn.Conn }

// Moved ends the stream here: the new process has its socket. Nothing is
// said to the client or to c2s; our copy of the descriptor is closed.
func (m *MovingStream) Moved() { m.decide <- true }

// Resume lets the stream carry on here (the takeover failed).
func (m *MovingStream) Resume() {
	if m.out.isDetached() {
		m.out.reattach(m.State.Unwritten)
	}
	m.decide <- false
}

// StopWriting stops the stream's writer after the message it is writing
// and collects what is left; call it once nothing more is queued (the
// link to ejabberd is paused). It fails if the writer is stuck on a
// client that does not read.
func (m *MovingStream) StopWriting(limit time.Duration) error {
	pending, ok := m.out.detach(limit)
	if !ok {
		return errors.New("the client is not reading")
	}
	m.State.Unwritten = pending
	if m.afterStop != nil {
		m.afterStop(&m.State)
	}
	info := m.conn.Info()
	m.State.BytesIn, m.State.BytesOut, m.State.JID, m.State.Session = info.BytesIn, info.BytesOut, info.JID, info.Session
	return nil
}

// PauseStreams stops the reader of every stream that can move, at a
// stanza boundary, within limit. Streams still opening, closing, or on TLS
// stay where they are.
func (r *Registry) PauseStreams(limit time.Duration) []*MovingStream {
	deadline := time.Now().Add(limit)
	var out []*MovingStream
	for _, c := range r.snapshot() {
		c.mu.Lock()
		mover := c.mover
		c.mu.Unlock()
		if mover == nil {
			continue
		}
		if m, err := mover.pauseForHandoff(deadline); err == nil {
			out = append(out, m)
		}
	}
	return out
}

// LastID returns the last connection ID handed out.
func (r *Registry) LastID() uint64 { return r.lastID.Load() }

// ContinueIDs makes the registry hand out IDs after last: the process it
// took over from used those, and ejabberd may still know them.
func (r *Registry) ContinueIDs(last uint64) {
	for {
		cur := r.lastID.Load()
		if cur >= last || r.lastID.CompareAndSwap(cur, last) {
			return
		}
	}
}

// adopt registers a connection that another process accepted.
func (r *Registry) adopt(raw net.Conn, st StreamState) *Conn {
	peer, _ := netip.ParseAddrPort(st.Peer)
	c := &Conn{Conn: raw, ID: st.ConnID, Peer: peer, Opened: st.Opened, registry: r,
		transport: st.Transport, jid: st.JID, session: st.Session}
	c.bytesIn.Store(st.BytesIn)
	c.bytesOut.Store(st.BytesOut)
	r.mu.Lock()
	r.conns[c.ID] = c
	r.perIP[peer.Addr()]++
	r.accepted++
	r.mu.Unlock()
	return c
}

// AdoptListener serves connections on a listening socket another process
// handed over; streams is as for ListenStreams.
func AdoptListener(inner net.Listener, registry *Registry, log *zap.Logger, streams bool) *Listener {
	return &Listener{Listener: inner, registry: registry, log: log, streams: streams}
}

// ListenerFD returns a duplicate of the listener's socket, to hand over;
// the caller closes it once sent.
func ListenerFD(l net.Listener) (*os.File, error) {
	if sl, ok := l.(*Listener); ok {
		l = sl.Listener
	}
	tl, ok := l.(*net.TCPListener)
	if !ok {
		return nil, errors.New("not a TCP listener")
	}
	return tl.File()
}

// StreamAdopter gives a moved stream back its c2s: the attachment that
// carried the stream's link hands it over.
type StreamAdopter interface {
	AdoptStream(connID uint64, sink StreamSink) (Stream, bool)
}

// AdoptC2S carries on a plain XMPP stream another process paused, on raw
// (its socket). It returns once the stream runs.
func AdoptC2S(registry *Registry, cfg C2SConfig, adopter StreamAdopter, st StreamState, raw net.Conn) error {
	if cfg.MaxPendingWrite <= 0 {
		cfg.MaxPendingWrite = 1 << 20
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	conn := registry.adopt(raw, st)
	c := &c2sConn{conn: clientSocket(conn), raw: conn, cfg: &cfg, log: cfg.Logger, headerSent: st.HeaderSent}
	stream, ok := adopter.AdoptStream(st.ConnID, c)
	if !ok {
		_ = conn.Close()
		return errors.New("no c2s was handed over for the stream")
	}
	conn.OnEnd(c.streamErrorCondition)
	c.shaper.setRate(st.ShaperRate)
	c.out = newOutbox(cfg.MaxPendingWrite, c)
	for _, b := range st.Unwritten {
		c.out.push(b)
	}
	r, err := c.resumeReader(st.Unread, st.MaxStanza)
	if err != nil {
		_ = conn.Close()
		stream.Close()
		return err
	}
	c.stream = stream
	r.parkWhenIdle(c)
	go c.run()
	return nil
}

// reader returns the reader of the stream proper (past TLS). A plain
// TCP stream may move: its framer holds the bytes past the last stanza
// boundary, which is what the next process needs.
func (c *c2sConn) reader(transport string, limits xmlstream.Limits) *streamReader {
	c.r = newStreamReader(c.conn, limits)
	c.r.shaper = &c.shaper
	if transport == "tcp" {
		c.raw.canMove(c, nil)
	}
	return c.r
}

// resumeReader reads a stream that is already open: unread first, then
// the socket.
func (c *c2sConn) resumeReader(unread []byte, maxStanza int64) (*streamReader, error) {
	r := c.reader("tcp", xmlstream.Limits{MaxStanzaBytes: maxStanza})
	r.framer.Resume()
	// unread is the start of one unit: it gives no event, only state.
	if err := r.framer.Feed(unread, r.push); err != nil {
		return nil, err
	}
	return r, nil
}

func (c *c2sConn) pauseForHandoff(deadline time.Time) (*MovingStream, error) {
	st, err := c.handoff.stopReader(c.raw, c.out, &c.shaper, deadline)
	if err != nil {
		return nil, err
	}
	st.Transport, st.Unread = "tcp", c.r.framer.Pending()
	return &MovingStream{State: st, conn: c.raw, out: c.out,
		decide: c.handoff.decision, afterStop: func(st *StreamState) {
			c.mu.Lock()
			st.HeaderSent = c.headerSent
			c.mu.Unlock()
		}}, nil
}

// park runs on the reader once it stopped for a takeover; it reports
// whether the stream moved (otherwise the reader reads on).
func (c *c2sConn) park() bool { return c.handoff.park(c.raw) }

// canMove registers the stream that may move with the connection, and
// the tap that records its bytes (WebSocket only).
func (c *Conn) canMove(m streamMover, rec *wsTap) {
	c.mu.Lock()
	c.mover, c.recorder = m, rec
	c.mu.Unlock()
}

// stopReader pauses an open stream's reader (see pause) and returns what
// every moving stream's state has.
func (h *streamHandoff) stopReader(conn *Conn, out *outbox, shaper *shaper, deadline time.Time) (StreamState, error) {
	if !h.requested.Load() && out.isClosing() {
		return StreamState{}, errors.New("stream closing")
	}
	if err := h.pause(conn, deadline); err != nil {
		return StreamState{}, err
	}
	return StreamState{ConnID: conn.ID, Peer: conn.Peer.String(), Opened: conn.Opened,
		ShaperRate: shaper.rate.Load(), MaxStanza: h.maxStanza.Load()}, nil
}

// pause asks the stream's reader to stop at its next boundary: a read
// deadline in the past ends the read it waits in, and a stream waiting in
// the poller is given a reader, which meets that deadline. The reader
// re-arms no deadline of its own, but a read may be under way (or the
// reader may park just after the wake-up), so both are repeated until the
// reader has stopped, within deadline.
func (h *streamHandoff) pause(conn *Conn, deadline time.Time) error {
	if !h.running.Load() {
		return errors.New("stream not open")
	}
	h.parked = make(chan struct{})
	h.decision = make(chan bool, 1)
	h.requested.Store(true)
	for {
		_ = conn.SetReadDeadline(time.Now().Add(-time.Second))
		conn.wakeReader()
		select {
		case <-h.parked:
			return nil
		case <-time.After(10 * time.Millisecond):
			if time.Now().After(deadline) {
				// The reader is busy (a slow Send, a shaper pause): it
				// stays. It may still park later; let it read on then.
				h.decision <- false
				return errors.New("the stream's reader did not stop in time")
			}
		}
	}
}

// park runs on the reader once it stopped: it waits for the takeover's
// decision and reports whether the stream moved.
func (h *streamHandoff) park(conn *Conn) bool {
	close(h.parked)
	moved := <-h.decision
	h.requested.Store(false)
	if !moved {
		_ = conn.SetReadDeadline(time.Time{})
	}
	return moved
}

// opened marks the stream as open (its reader feeds c2s), so it may move.
func (h *streamHandoff) opened(maxStanza int64) {
	h.maxStanza.Store(maxStanza)
	h.running.Store(true)
}
