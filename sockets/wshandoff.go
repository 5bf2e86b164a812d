package sockets

// Hot upgrade of WebSocket streams. Between two messages a server-side
// WebSocket has no state beyond its socket: frames are self-contained, and
// we negotiate no extension. What needs care is the reader: gorilla reads
// ahead into its own buffer and keeps a read error for good, so the stream
// cannot simply be stopped and read on. Instead wsTap records, below
// gorilla, what the client sent from the end of the last message the
// stream read, and finds where messages end in it. When the reader stops
// for a takeover (a read deadline in the past), whatever gorilla had
// buffered is a prefix of a message not yet returned, so the recorded
// bytes are exactly what the next reader must see.
//
// gorilla/websocket v1.5.3 offers no way to build a server-side Conn on a
// socket that is already upgraded (newConn is unexported). The one public
// door is Upgrader.Upgrade, so resumeWebSocket goes through it with the
// request the client made (re-created), on a connection wrapper that
// swallows the 101 answer (the client had it from the old process) and
// hands gorilla the recorded bytes before the socket's. The client sees
// nothing of it.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// wsTap records a WebSocket's incoming bytes from the end of the last
// message read, and where the messages in them end.
type wsTap struct {
	buf    []byte
	base   int64   // stream offset of buf[0]: the end of the last message read
	end    int64   // stream offset after the last byte recorded
	next   int64   // stream offset of the next frame header to look at
	ends   []int64 // where the data messages seen end, oldest first
	broken bool    // a frame length we cannot follow: the stream cannot move
}

// record runs in Conn.Read, on the stream's reader.
func (t *wsTap) record(b []byte) {
	t.buf = append(t.buf, b...)
	t.end += int64(len(b))
	for !t.broken && t.next < t.end {
		size, fin, control, ok := wsFrameSize(t.buf[t.next-t.base:])
		if !ok {
			return // the header is not all here yet
		}
		if size < 0 {
			t.broken = true
			return
		}
		if fin && !control {
			t.ends = append(t.ends, t.next+size)
		}
		t.next += size
	}
}

// messageRead moves the start past the message the stream just read.
func (t *wsTap) messageRead() {
	if t == nil || t.broken {
		return
	}
	if len(t.ends) == 0 {
		t.broken = true // gorilla returned a message we did not see end
		return
	}
	boundary := t.ends[0]
	t.ends = t.ends[1:]
	t.buf = append(t.buf[:0], t.buf[boundary-t.base:]...)
	t.base = boundary
}

// unconsumed is what the next reader must read first.
func (t *wsTap) unconsumed() ([]byte, error) {
	if t == nil || t.broken {
		return nil, errors.New("the WebSocket's frames could not be followed")
	}
	return bytes.Clone(t.buf), nil
}

// wsFrameSize reads a client frame's header (RFC 6455 §5.2): the frame's
// whole size, whether it ends a message, and whether it is a control
// frame. ok is false while the header is incomplete; size is -1 for a
// length we will not follow.
func wsFrameSize(h []byte) (size int64, fin, control, ok bool) {
	if len(h) < 2 {
		return 0, false, false, false
	}
	fin, control = h[0]&0x80 != 0, h[0]&0x08 != 0
	headerLen, payload := int64(2), int64(h[1]&0x7f)
	switch payload {
	case 126:
		if len(h) < 4 {
			return 0, false, false, false
		}
		headerLen, payload = 4, int64(binary.BigEndian.Uint16(h[2:]))
	case 127:
		if len(h) < 10 {
			return 0, false, false, false
		}
		headerLen = 10
		n := binary.BigEndian.Uint64(h[2:])
		if n > 1<<40 {
			return -1, fin, control, true
		}
		payload = int64(n)
	}
	if h[1]&0x80 != 0 {
		headerLen += 4 // the mask
	}
	return headerLen + payload, fin, control, true
}

// startTap starts recording right after the upgrade: gorilla refuses data
// sent before the handshake completed, so nothing is buffered yet.
func (c *wsConn) startTap() {
	c.tap = &wsTap{}
	c.conn.canMove(c, c.tap)
}

// resumedConn is a WebSocket's socket as the resumed gorilla Conn sees it:
// the recorded bytes come first, and the 101 answer to the re-created
// request is swallowed.
type resumedConn struct {
	net.Conn
	unread   []byte
	answered bool
}

func (r *resumedConn) Read(b []byte) (int, error) {
	if len(r.unread) > 0 {
		n := copy(b, r.unread)
		r.unread = r.unread[n:]
		return n, nil
	}
	return r.Conn.Read(b)
}

func (r *resumedConn) Write(b []byte) (int, error) {
	if !r.answered {
		r.answered = true
		if !bytes.HasPrefix(b, []byte("HTTP/1.1 101 ")) {
			return 0, errors.New("unexpected handshake answer from the WebSocket library")
		}
		return len(b), nil
	}
	return r.Conn.Write(b)
}

// hijacked is the ResponseWriter Upgrade hijacks: the socket itself.
type hijacked struct {
	header http.Header
	conn   net.Conn
}

func (h *hijacked) Header() http.Header         { return h.header }
func (h *hijacked) Write(b []byte) (int, error) { return 0, errors.New("not an HTTP response") }
func (h *hijacked) WriteHeader(int)             {}
func (h *hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return h.conn, bufio.NewReadWriter(bufio.NewReader(h.conn), bufio.NewWriter(h.conn)), nil
}

// resumeWebSocket builds a gorilla Conn on a WebSocket that is already
// open, whose client has sent unread (from a message boundary on).
func (c *wsConn) resumeWebSocket(unread []byte, maxStanza int64) error {
	tap := &wsTap{}
	tap.record(unread)
	req := &http.Request{Method: http.MethodGet, ProtoMajor: 1, ProtoMinor: 1, Header: http.Header{
		"Upgrade":                {"websocket"},
		"Connection":             {"Upgrade"},
		"Sec-Websocket-Version":  {"13"},
		"Sec-Websocket-Key":      {"bWVnYXBob25lIHJlc3VtZQ=="},
		"Sec-Websocket-Protocol": {"xmpp"},
	}}
	up := websocket.Upgrader{Subprotocols: []string{"xmpp"}, ReadBufferSize: wsReadBufferSize, WriteBufferPool: wsWriteBuffers,
		CheckOrigin: func(*http.Request) bool { return true }}
	ws, err := up.Upgrade(&hijacked{header: http.Header{}, conn: &resumedConn{Conn: c.conn, unread: unread}}, req, nil)
	if err != nil {
		return err
	}
	if maxStanza <= 0 {
		maxStanza = xmlstream.DefaultMaxStanzaBytes
	}
	ws.SetReadLimit(maxStanza + 1024)
	c.ws = ws
	c.tap = tap
	c.conn.canMove(c, tap)
	return nil
}

// readMessages hands the client's messages to c2s until the stream ends,
// or it moves to a new sidecar process.
func (c *wsConn) readMessages(stream Stream, limits xmlstream.Limits) {
	for {
		err := c.pumpMessages(stream, limits)
		if err == nil || !c.handoff.requested.Load() || !c.parkWebSocket(limits.MaxStanzaBytes) {
			return
		}
	}
}

// pumpMessages returns the read error that stopped it, or nil once it has
// ended the stream itself.
func (c *wsConn) pumpMessages(stream Stream, limits xmlstream.Limits) error {
	c.handoff.opened(limits.MaxStanzaBytes)
	for {
		ev, err := c.readEvent(limits)
		if err != nil {
			return err
		}
		if err := stream.Send([]etf.Term{ev}); err != nil {
			c.streamError("remote-connection-failed")
			return nil
		}
	}
}

func (c *wsConn) pauseForHandoff(deadline time.Time) (*MovingStream, error) {
	st, err := c.handoff.stopReader(c.conn, c.out, &c.shaper, deadline)
	if err != nil {
		return nil, err
	}
	if st.Unread, err = c.tap.unconsumed(); err != nil {
		c.handoff.decision <- false // it stays, and reads on
		return nil, err
	}
	st.Transport = "websocket"
	return &MovingStream{State: st, conn: c.conn, out: c.out,
		decide: c.handoff.decision}, nil
}

// parkWebSocket runs on the reader once it stopped for a takeover; it
// reports whether to read on here (the takeover failed). gorilla keeps a
// read error for good, so reading on takes a fresh Conn on the recorded
// bytes, once the writer has let go of the old one.
func (c *wsConn) parkWebSocket(maxStanza int64) bool {
	if c.handoff.park(c.conn) {
		return false
	}
	unread, err := c.tap.unconsumed()
	if err == nil {
		pending, stopped := c.out.detach(5 * time.Second)
		if !stopped {
			err = errors.New("the client is not reading")
		} else if err = c.resumeWebSocket(unread, maxStanza); err == nil {
			c.out.reattach(pending)
			return true
		}
	}
	c.log.Info("WebSocket stream cannot read on after a failed takeover; closing", c.connField(), zap.Error(err))
	_ = c.conn.Close()
	return false
}

// AdoptWebSocket carries on a WebSocket stream another process paused, on
// raw (its socket). It returns once the stream runs.
func AdoptWebSocket(registry *Registry, cfg WebSocketConfig, adopter StreamAdopter, st StreamState, raw net.Conn) error {
	cfg = cfg.withDefaults()
	conn := registry.adopt(raw, st)
	c := &wsConn{conn: conn, cfg: cfg, log: cfg.Logger}
	if err := c.resumeWebSocket(st.Unread, st.MaxStanza); err != nil {
		_ = conn.Close()
		return err
	}
	stream, ok := adopter.AdoptStream(st.ConnID, c)
	if !ok {
		_ = conn.Close()
		return errors.New("no c2s was handed over for the stream")
	}
	c.start(st)
	go func() {
		defer func() { _ = c.ws.Close() }() // the Conn of the moment
		defer c.out.shutdown()
		defer stream.Close()
		c.readMessages(stream, xmlstream.Limits{MaxStanzaBytes: st.MaxStanza})
	}()
	return nil
}

// start gives an adopted stream its hooks and its writer.
func (c *wsConn) start(st StreamState) {
	c.conn.OnEnd(c.streamError)
	c.shaper.setRate(st.ShaperRate)
	c.out = newOutbox(c.cfg.MaxPendingWrite, c)
	for _, b := range st.Unwritten {
		c.out.push(b)
	}
}
