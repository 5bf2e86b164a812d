package sockets

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

// WebSocketConfig tunes XMPP over WebSocket (RFC 7395).
type WebSocketConfig struct {
	// MaxPendingWrite bounds what may wait to be written to one client;
	// 0 means 1 MiB.
	MaxPendingWrite int
	// HandshakeTimeout bounds the wait for <open/> and for c2s to start.
	HandshakeTimeout time.Duration
	Logger           *zap.Logger
}

// WebSocketHandler serves XMPP over WebSocket on an HTTP path (/ws): each
// message is one element, parsed here and handed to c2s in element mode.
type WebSocketHandler struct {
	cfg      WebSocketConfig
	backend  StreamBackend
	upgrader websocket.Upgrader
}

// NewWebSocketHandler returns the handler.
func NewWebSocketHandler(cfg WebSocketConfig, backend StreamBackend) *WebSocketHandler {
	return &WebSocketHandler{cfg: cfg.withDefaults(), backend: backend, upgrader: websocket.Upgrader{
		Subprotocols:    []string{"xmpp"},
		ReadBufferSize:  wsReadBufferSize,
		WriteBufferPool: wsWriteBuffers,
		// Browser clients of any origin may connect, as with ejabberd's
		// own /ws; authentication is XMPP's business.
		CheckOrigin: func(*http.Request) bool { return true },
	}}
}

// An idle WebSocket should hold little: gorilla keeps its read buffer for
// the life of the connection (by default the 4 KiB one net/http read the
// upgrade with), so it gets a small one of its own (large messages are
// read past it, straight into the message), and takes a write buffer
// from a shared pool only while it writes a message.
const wsReadBufferSize = 512

var wsWriteBuffers = &sync.Pool{}

func (cfg WebSocketConfig) withDefaults() WebSocketConfig {
	if cfg.MaxPendingWrite <= 0 {
		cfg.MaxPendingWrite = 1 << 20
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return cfg
}

// ServeHTTP upgrades the request and runs the stream.
func (h *WebSocketHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	conn, err := ConnFrom(r.Context())
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusUpgradeRequired)
		_, _ = w.Write([]byte("XMPP over WebSocket (RFC 7395) lives here; connect with a WebSocket client, subprotocol xmpp.\n"))
		return
	}
	if conn.registry.Draining() {
		http.Error(w, "this server is draining: connect to another one", http.StatusServiceUnavailable)
		return
	}
	if !hasXMPPSubprotocol(r) {
		http.Error(w, "the xmpp WebSocket subprotocol is required (RFC 7395)", http.StatusBadRequest)
		return
	}
	ws, err := h.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered the client
	}
	defer ws.Close()
	maxStanza := conn.registry.Limits().MaxStanzaBytes
	if maxStanza <= 0 {
		maxStanza = xmlstream.DefaultMaxStanzaBytes
	}
	ws.SetReadLimit(maxStanza + 1024)
	c := &wsConn{ws: ws, conn: conn, cfg: h.cfg, log: h.cfg.Logger}
	c.startTap()
	conn.SetTransport("websocket")
	conn.OnEnd(c.streamError)
	c.out = newOutbox(h.cfg.MaxPendingWrite, c)
	defer c.out.shutdown()

	limits := xmlstream.Limits{MaxStanzaBytes: maxStanza}
	_ = ws.SetReadDeadline(time.Now().Add(h.cfg.HandshakeTimeout))
	open, err := c.readEvent(limits)
	if err != nil {
		return
	}
	if t, ok := open.(etf.Tuple); !ok || t[0] != etf.Atom("xmlstreamstart") {
		c.streamError("not-well-formed")
		return
	}
	local := addrPort(conn.LocalAddr())
	ctx, cancel := context.WithTimeout(r.Context(), h.cfg.HandshakeTimeout)
	stream, err := h.backend.OpenStream(ctx, etf.C2SOpen{ConnID: conn.ID, Transport: "websocket", Peer: conn.Peer, Local: local}, c)
	cancel()
	if err != nil {
		c.log.Info("ejabberd did not take the stream", c.connField(), zap.Error(err))
		c.streamError("remote-connection-failed")
		return
	}
	defer stream.Close()
	conn.SetSession(stream.Describe())
	if n := stanzaLimit(conn.Limits().MaxStanzaBytes, stream.MaxStanzaBytes()); n > 0 {
		limits.MaxStanzaBytes = n
		ws.SetReadLimit(n + 1024)
	}
	_ = ws.SetReadDeadline(time.Time{})
	if err := stream.Send([]etf.Term{open}); err != nil {
		return
	}
	c.readMessages(stream, limits)
}

func hasXMPPSubprotocol(r *http.Request) bool {
	for _, p := range websocket.Subprotocols(r) {
		if p == "xmpp" {
			return true
		}
	}
	return false
}

// wsConn is one WebSocket client stream.
type wsConn struct {
	ws   *websocket.Conn
	conn *Conn
	cfg  WebSocketConfig
	log  *zap.Logger // shared; call sites add connField (see c2sConn.log)

	out    *outbox
	shaper shaper

	tap     *wsTap // what the client sent from the last message read on
	handoff streamHandoff
}

// connField names the connection in a log line.
func (c *wsConn) connField() zap.Field { return zap.Uint64("conn", c.conn.ID) }

// overflow disconnects a client that reads slower than ejabberd writes.
func (c *wsConn) overflow() {
	c.log.Info("client reads too slowly; disconnecting", c.connField(), zap.Int("limit", c.cfg.MaxPendingWrite))
	_ = c.conn.Close()
}

// readEvent reads one message and turns it into a c2s event; a broken
// message gets a stream error.
func (c *wsConn) readEvent(limits xmlstream.Limits) (etf.Term, error) {
	kind, msg, err := c.ws.ReadMessage()
	if pause := c.shaper.delay(len(msg)); pause > 0 {
		time.Sleep(pause) // reading waits, as ejabberd's shaper makes it
	}
	if err == nil {
		c.tap.messageRead()
	}
	if err != nil && c.handoff.requested.Load() {
		return nil, err // stopped for a takeover: nothing is wrong
	}
	if err != nil {
		switch {
		case websocket.IsCloseError(err, websocket.CloseMessageTooBig) || err == websocket.ErrReadLimit:
			c.streamError("policy-violation")
		case isTimeout(err): // no <open/> in time
			c.streamError("connection-timeout")
		}
		return nil, err
	}
	if kind != websocket.TextMessage {
		c.streamError("unsupported-encoding")
		return nil, errBinaryMessage
	}
	el, err := xmlstream.ParseElement(msg, limits)
	if err != nil {
		c.log.Info("bad WebSocket message", c.connField(), zap.Error(err))
		if cond := conditionOf(err); cond != "" {
			c.streamError(cond)
		}
		return nil, err
	}
	return xmlstream.FromWebSocket(el), nil
}

// Write queues one c2s event as a WebSocket message (StreamSink).
func (c *wsConn) Write(ev etf.Term) {
	b, ok, err := xmlstream.AppendWebSocketMessage(nil, ev)
	if err != nil {
		c.log.Warn("unwritable event from ejabberd; closing", c.connField(), zap.Error(err))
		c.Close("bad event")
		return
	}
	learnJID(c.conn, ev)
	if ok {
		c.out.push(b)
	}
}

// Close ends the connection once what is queued is written (StreamSink).
func (c *wsConn) Close(reason string) { c.out.close() }

// Abort ends the stream with a stream error: ejabberd is out of reach
// (StreamSink).
func (c *wsConn) Abort(condition string) { c.streamError(condition) }

// Shape applies ejabberd's c2s shaper to what the client sends (StreamSink).
func (c *wsConn) Shape(bytesPerSec int64) { c.shaper.setRate(bytesPerSec) }

// write sends one queued message (the outbox's writer is the connection's
// one writer, as the WebSocket library requires).
func (c *wsConn) write(m []byte) error {
	_ = c.ws.SetWriteDeadline(time.Now().Add(30 * time.Second))
	return c.ws.WriteMessage(websocket.TextMessage, m)
}

func (c *wsConn) closeConn() {
	_ = c.ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	_ = c.ws.UnderlyingConn().Close()
}

func (c *wsConn) streamError(cond string) {
	c.conn.registry.countStreamError(cond)
	b, _ := xmlstream.AppendElement(nil, etf.Tuple{etf.Atom("xmlel"), []byte("stream:error"),
		etf.List{etf.Tuple{[]byte("xmlns:stream"), []byte("http://etherx.jabber.org/streams")}},
		etf.List{etf.Tuple{etf.Atom("xmlel"), []byte(cond), etf.List{etf.Tuple{[]byte("xmlns"), []byte(nsStreams)}}, etf.List{}}}})
	c.out.push(b)
	closeMsg, _, _ := xmlstream.AppendWebSocketMessage(nil, etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")})
	c.out.push(closeMsg)
	c.out.close()
}

// isTimeout reports a read that hit its deadline. gorilla/websocket hides
// the net package's error behind its own, so errors.Is cannot see it.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
