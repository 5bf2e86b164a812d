package node

// Hot upgrade: a new sidecar process takes over this node's identity and
// its live distribution links, so that ejabberd never sees the node go
// down (no 'DOWN', no noconnection, every c2s keeps running). See
// docs/ARCHITECTURE.md, "Hot upgrade".
//
// The old process pauses each link at a frame boundary (its reader parks,
// its writers wait on the write lock), hands the socket, the bytes it read
// but did not dispatch, and the link's bookkeeping to the new process, and
// then becomes a relay: whatever it still writes (for the connections it
// kept, e.g. TLS streams) goes out through the new process, and the new
// process passes back what arrives for them.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/megaphone-im/megaphone/etf"
)

// Identity is what makes our pids and references ours: the new process
// must carry it on unchanged, or ejabberd's monitors and c2s processes
// would be talking to a stranger.
type Identity struct {
	Name     string
	Creation uint32
	Refs     uint64 // references made so far; the new process continues after them
}

// Identity returns the node's identity, for a takeover.
func (n *Node) Identity() Identity {
	return Identity{Name: string(n.name), Creation: n.creation, Refs: n.refs.Load()}
}

// Restore creates a node that carries on the identity of the process it
// takes over from, instead of a fresh creation.
func Restore(cfg Config, id Identity) (*Node, error) {
	cfg.Name = id.Name
	n, err := New(cfg)
	if err != nil {
		return nil, err
	}
	n.creation = id.Creation
	n.self = etf.Pid{Node: n.name, ID: 1, Creation: id.Creation}
	n.refs.Store(id.Refs)
	return n, nil
}

// LinkHandoff is a paused link, ready to be carried on by another process.
type LinkHandoff struct {
	Peer         string
	PeerFlags    uint64
	PeerCreation uint32
	// Unread is what was read from the socket but not yet dispatched: the
	// new process reads it before the socket.
	Unread    []byte
	Monitors  []MonitorState
	Links     []etf.Pid
	UnlinkIDs uint64
}

// MonitorState is a peer process's monitor on our pid, carried over.
type MonitorState struct {
	From etf.Pid
	Ref  etf.Ref
}

// pauseTimeout bounds how long the reader may take to reach a frame
// boundary; it only waits for the frame being dispatched.
const pauseTimeout = 5 * time.Second

// pause stops the link's reader at a frame boundary and holds its write
// lock, so nothing more crosses the socket from this process. It returns
// the link's state; the caller must then call relayThrough or resume.
func (l *Link) pause() (LinkHandoff, error) {
	l.pausing.Store(true)
	deadline := time.Now().Add(pauseTimeout)
	// The reader parks at its next frame boundary; if it waits in a read,
	// a deadline in the past ends the wait. It re-arms its own deadline
	// before each read, so ours is set again until it has parked (bounded
	// by pauseTimeout).
	for parked := false; !parked; {
		_ = l.conn.SetReadDeadline(time.Now().Add(-time.Second))
		select {
		case <-l.parked:
			parked = true
		case <-l.done:
			return LinkHandoff{}, fmt.Errorf("link to %s went down: %w", l.peer.name, l.closeErr)
		case <-time.After(10 * time.Millisecond):
			if time.Now().After(deadline) {
				l.pausing.Store(false)
				return LinkHandoff{}, errors.New("the link's reader did not reach a frame boundary")
			}
		}
	}
	l.writeMu.Lock() // held until relayThrough or resume
	st := LinkHandoff{Peer: l.peer.name, PeerFlags: l.peer.flags, PeerCreation: l.peer.creation,
		Unread: l.unread, UnlinkIDs: l.unlinkIDs.Load()}
	l.stateMu.Lock()
	for _, m := range l.monitors {
		st.Monitors = append(st.Monitors, MonitorState{From: m.from, Ref: m.ref})
	}
	for p := range l.links {
		st.Links = append(st.Links, p)
	}
	l.stateMu.Unlock()
	return st, nil
}

// parkReader is called by the reader when a read fails: if the link is
// being paused, consumed (the part of a frame already taken from the
// reader) and whatever the reader holds are kept for the new process, and
// the reader stops without taking the link down.
func (l *Link) parkReader(consumed []byte) bool {
	if !l.pausing.Load() {
		return false
	}
	buffered, _ := l.reader.Peek(l.reader.Buffered())
	l.unread = append(bytes.Clone(consumed), buffered...)
	close(l.parked)
	return true
}

// resume undoes pause: the takeover failed before the new process used
// the socket, so this process carries on.
func (l *Link) resume() {
	l.reader = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(l.unread), l.conn), 64<<10)
	l.unread = nil
	l.parked = make(chan struct{})
	l.pausing.Store(false)
	_ = l.conn.SetReadDeadline(time.Time{})
	l.writeMu.Unlock()
	go l.readLoop(l.silence)
}

// relayThrough ends the pause for good: the socket now belongs to the new
// process, and every frame this process still writes goes to send, which
// hands it to the new process to write.
func (l *Link) relayThrough(send func(frame []byte) error) {
	l.relay = send
	_ = l.conn.Close() // our copy of the descriptor; the new process holds its own
	l.writeMu.Unlock()
}

// deliverRelayed hands the link's handler a message the new process
// passed back (one for a connection this process kept).
func (l *Link) deliverRelayed(d Delivery) { l.handler(l, d) }

// adoptLink carries on a link another process paused, on conn (the same
// socket, received over SCM_RIGHTS). Its reader and ticker start with start.
func (n *Node) adoptLink(conn net.Conn, st LinkHandoff, handler Handler) *Link {
	l := n.newLink(conn, bufio.NewReaderSize(io.MultiReader(bytes.NewReader(st.Unread), conn), 64<<10),
		peerInfo{name: st.Peer, flags: st.PeerFlags, creation: st.PeerCreation}, handler)
	for _, m := range st.Monitors {
		l.monitors[m.Ref.String()] = monitorEntry{from: m.From, ref: m.Ref}
	}
	for _, p := range st.Links {
		l.links[p] = struct{}{}
	}
	l.unlinkIDs.Store(st.UnlinkIDs)
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
	return l
}

// start runs the link's reader and ticker.
func (l *Link) start() {
	l.silence = 4*l.node.cfg.TickInterval + 5*time.Second
	go l.readLoop(l.silence)
	go l.tickLoop(l.node.cfg.TickInterval)
}

// WriteRelayedFrame writes a frame the old process handed over (it is
// already encoded, its sender is our own pid).
func (l *Link) writeRelayedFrame(frame []byte) error {
	if len(frame) == 4 {
		return nil // a tick: this process ticks for itself
	}
	return l.writeFrame(frame)
}

// AttachmentHandoff is one attachment in flight between two processes.
type AttachmentHandoff struct {
	Peer     string
	Attached bool // false: the new process just attaches afresh
	Link     LinkHandoff
	Shim     etf.Pid
	Version  int
	Token    []byte  // the session's secret (protocol version 3 on)
	Monitor  etf.Ref // our monitor on the shim's session
	Streams  []StreamHandoff
}

// StreamHandoff is ejabberd's end of one client stream that moves.
type StreamHandoff struct {
	ConnID    uint64
	C2S       etf.Pid
	Monitor   etf.Ref
	MaxStanza int64
}

// errHandedOver ends an attachment whose link moved to another process.
var errHandedOver = errors.New("handed over to a new sidecar process")

// Pause stops the attachment's link for a takeover (see Link.pause). The
// streams listed move with it; the others stay here, and are served
// through the new process once RelayThrough is called. The caller must
// call Resume or RelayThrough (or Abandon) next.
func (a *Attachment) Pause(moving []uint64) (AttachmentHandoff, error) {
	a.mu.Lock()
	s := a.cur
	a.mu.Unlock()
	if s == nil {
		return AttachmentHandoff{Peer: a.peer}, nil
	}
	ls, err := s.link.pause()
	if err != nil {
		return AttachmentHandoff{}, err
	}
	st := AttachmentHandoff{Peer: a.peer, Attached: true, Link: ls, Shim: s.shim, Version: s.version, Token: s.token, Monitor: s.monitor}
	a.mu.Lock()
	for _, id := range moving {
		if e := a.streams[id]; e != nil && e.session == s {
			st.Streams = append(st.Streams, StreamHandoff{ConnID: id, C2S: e.c2s, Monitor: e.ref, MaxStanza: e.maxStanza})
		}
	}
	a.mu.Unlock()
	a.paused = s
	return st, nil
}

// Resume undoes Pause.
func (a *Attachment) Resume() {
	if s := a.paused; s != nil {
		a.paused = nil
		s.link.resume()
	}
}

// RelayThrough completes the takeover on the old side: the moved streams
// are forgotten (without a word to their c2s: they live on in the new
// process), and the link relays through send from now on. The attachment
// stops re-attaching: when the relay ends, so does it.
func (a *Attachment) RelayThrough(moved []uint64, send func(frame []byte) error) {
	for _, id := range moved {
		a.forgetStream(id)
	}
	if s := a.paused; s != nil {
		a.paused = nil
		s.link.relayThrough(send)
	}
	close(a.handedOver)
}

// DeliverRelayed hands the attachment a message the new process passed
// back. Calls must come from one goroutine, in arrival order.
func (a *Attachment) DeliverRelayed(d Delivery) {
	a.mu.Lock()
	s := a.cur
	a.mu.Unlock()
	if s != nil {
		s.link.deliverRelayed(d)
	}
}

// RelayEnded takes the relayed link down: the new process or its link to
// ejabberd went away, and with it the way to the streams kept here.
func (a *Attachment) RelayEnded(reason string) {
	a.mu.Lock()
	s := a.cur
	a.mu.Unlock()
	if s != nil {
		s.link.closeWith(errors.New(reason))
	}
}

// WriteRelayedFrame writes a frame the old process sent through us.
func (a *Attachment) WriteRelayedFrame(frame []byte) error {
	a.mu.Lock()
	s := a.cur
	a.mu.Unlock()
	if s == nil {
		return ErrNotAttached
	}
	return s.link.writeRelayedFrame(frame)
}

// ForwardUnknown makes the attachment pass every message it has no
// taker for (output for a stream it does not carry, a BOSH answer it did
// not ask for, a 'DOWN' of a monitor it did not set) to forward: they
// belong to the old process's connections. forward must not block for
// long: it runs on the link's reader.
func (a *Attachment) ForwardUnknown(forward func(Delivery)) {
	if forward == nil {
		a.forward.Store(nil)
		return
	}
	a.forward.Store(&forward)
}

// PausedConn returns the socket of the link Pause stopped (nil if the
// attachment was not attached), to be handed over.
func (a *Attachment) PausedConn() net.Conn {
	if a.paused == nil {
		return nil
	}
	return a.paused.link.conn
}

// LinkDone returns a channel closed when the current link goes down (nil
// while detached).
func (a *Attachment) LinkDone() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cur == nil {
		return nil
	}
	return a.cur.link.Done()
}

func (a *Attachment) forwardUnknown(d Delivery) bool {
	if f := a.forward.Load(); f != nil {
		(*f)(d)
		return true
	}
	return false
}

// Adopt carries on an attachment another process handed over, on conn
// (its link's socket); until ctx ends it re-attaches like Attach when the
// link drops. Nothing runs until Start.
func (n *Node) Adopt(ctx context.Context, st AttachmentHandoff, conn net.Conn, build string) *Attachment {
	a := n.newAttachment(st.Peer, build)
	if !st.Attached || conn == nil {
		a.startRun = func() { go a.run(ctx) }
		return a
	}
	welcome := make(chan any, 1)
	link := n.adoptLink(conn, st.Link, a.handle(welcome))
	s := &session{link: link, shim: st.Shim, version: st.Version, token: st.Token, monitor: st.Monitor}
	a.cur = s
	close(a.ready)
	a.since = time.Now()
	for _, sh := range st.Streams {
		ref := sh.Monitor.String()
		a.adopted[sh.ConnID] = &streamEntry{session: s, monitor: ref, c2s: sh.C2S, ref: sh.Monitor, maxStanza: sh.MaxStanza}
	}
	a.startRun = func() {
		link.start()
		go func() {
			err := a.serve(ctx, s)
			a.setDetached(err.Error())
			a.run(ctx)
		}()
	}
	return a
}

// Start runs an adopted attachment: its link's reader and ticker, and the
// re-attach loop behind them.
func (a *Attachment) Start() {
	if a.startRun != nil {
		a.startRun()
		a.startRun = nil
	}
}

// AdoptStream gives a moved stream its new sink, and returns the stream to
// send the client's events on. ok is false if the stream was not handed
// over with the attachment.
func (a *Attachment) AdoptStream(connID uint64, sink StreamSink) (*Stream, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.adopted[connID]
	if e == nil {
		return nil, false
	}
	delete(a.adopted, connID)
	e.sink = sink
	a.streams[connID] = e
	a.byMonitor[e.monitor] = connID
	return &Stream{a: a, s: e.session, connID: connID, c2s: e.c2s, maxStanza: e.maxStanza}, true
}

func (a *Attachment) isHandedOver() bool {
	select {
	case <-a.handedOver:
		return true
	default:
		return false
	}
}
