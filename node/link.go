package node

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// Control message operations (erts "Distribution Protocol", Protocol between
// connected nodes).
const (
	opLink             = 1
	opSend             = 2
	opExit             = 3
	opUnlink           = 4
	opRegSend          = 6
	opGroupLeader      = 7
	opExit2            = 8
	opSendTT           = 12
	opExitTT           = 13
	opRegSendTT        = 16
	opExit2TT          = 18
	opMonitorP         = 19
	opDemonitorP       = 20
	opMonitorPExit     = 21
	opSendSender       = 22
	opSendSenderTT     = 23
	opPayloadExit      = 24
	opPayloadExitTT    = 25
	opPayloadExit2     = 26
	opPayloadExit2TT   = 27
	opPayloadMonitorPX = 28
	opUnlinkID         = 35
	opUnlinkIDAck      = 36

	passThrough = 112 // 'p': a message without a distribution header
)

// maxFrame bounds one distribution frame. BOSH bodies and stanzas are capped
// far below this at the edge; a larger frame means a broken or hostile peer.
const maxFrame = 64 << 20

// Delivery is one message that arrived for a process of the sidecar.
type Delivery struct {
	To     etf.Pid  // set when sent to a pid
	ToName etf.Atom // set when sent to a registered name
	From   etf.Pid  // zero when the peer did not say
	Msg    etf.Term
}

// Handler receives deliveries. It runs on the link's reader goroutine, in
// arrival order, so it must not block: the next frame is read only after it
// returns, which is also what pushes back on a peer that floods us.
type Handler func(*Link, Delivery)

// Link is one live distribution connection to an Erlang node.
type Link struct {
	node    *Node
	peer    peerInfo
	conn    net.Conn
	reader  *bufio.Reader
	handler Handler
	log     *zap.Logger

	writeMu      sync.Mutex
	writeTimeout time.Duration
	lastWrite    atomic.Int64 // unix nanos of the last frame written

	stateMu  sync.Mutex
	monitors map[string]monitorEntry // by reference, from the peer to us
	links    map[etf.Pid]struct{}    // peer pids linked to our process

	done      chan struct{}
	closeOnce sync.Once
	closeErr  error

	sent, received atomic.Uint64
	unlinkIDs      atomic.Uint64

	// A takeover (handoff.go) parks the reader at a frame boundary and,
	// once the socket has moved, sends every frame through relay.
	pausing atomic.Bool
	parked  chan struct{}
	unread  []byte
	relay   func(frame []byte) error
	silence time.Duration
}

// newLink makes a link over conn, whose next bytes reader reads; start
// begins reading and ticking.
func (n *Node) newLink(conn net.Conn, reader *bufio.Reader, info peerInfo, handler Handler) *Link {
	l := &Link{
		node:         n,
		peer:         info,
		conn:         conn,
		reader:       reader,
		handler:      handler,
		log:          n.log.With(zap.String("peer", info.name)),
		writeTimeout: n.cfg.WriteTimeout,
		monitors:     make(map[string]monitorEntry),
		links:        make(map[etf.Pid]struct{}),
		done:         make(chan struct{}),
		parked:       make(chan struct{}),
	}
	l.lastWrite.Store(time.Now().UnixNano())
	return l
}

type monitorEntry struct {
	from etf.Pid
	ref  etf.Ref
}

// Peer returns the peer's node name.
func (l *Link) Peer() string { return l.peer.name }

// Hidden reports whether the link is hidden on both sides (it always is:
// we never advertise DFLAG_PUBLISHED).
func (l *Link) Hidden() bool { return ourFlags&flagPublished == 0 }

// Done is closed when the link is down.
func (l *Link) Done() <-chan struct{} { return l.done }

// Err says why the link went down, once Done is closed.
func (l *Link) Err() error {
	<-l.done
	return l.closeErr
}

// Stats returns the messages sent and received on this link.
func (l *Link) Stats() (sent, received uint64) { return l.sent.Load(), l.received.Load() }

// Close takes the link down. The peer sees the connection drop, which fires
// its monitors and links to our processes with reason noconnection.
func (l *Link) Close() { l.closeWith(errors.New("closed")) }

func (l *Link) closeWith(err error) {
	l.closeOnce.Do(func() {
		l.closeErr = err
		_ = l.conn.Close()
		close(l.done)
	})
}

// Send sends msg to a process on the peer node.
func (l *Link) Send(to etf.Pid, msg etf.Term) error {
	var ctl etf.Tuple
	if l.peer.flags&flagSendSender != 0 {
		ctl = etf.Tuple{opSendSender, l.node.self, to}
	} else {
		ctl = etf.Tuple{opSend, etf.Atom(""), to}
	}
	return l.writeMessage(ctl, msg)
}

// RegSend sends msg to the process registered as name on the peer node.
func (l *Link) RegSend(name etf.Atom, msg etf.Term) error {
	return l.writeMessage(etf.Tuple{opRegSend, l.node.self, etf.Atom(""), name}, msg)
}

// writeMessage encodes a control message and its payload and writes them as
// one frame. Frames from concurrent callers never interleave, and a caller's
// frames go out in the order it wrote them.
func (l *Link) writeMessage(ctl etf.Term, msg etf.Term) error {
	buf := make([]byte, 4, 256)
	buf = append(buf, passThrough)
	buf, err := etf.AppendEncode(buf, ctl)
	if err != nil {
		return err
	}
	if msg != nil {
		if buf, err = etf.AppendEncode(buf, msg); err != nil {
			return err
		}
	}
	binary.BigEndian.PutUint32(buf, uint32(len(buf)-4))
	if err := l.writeFrame(buf); err != nil {
		return err
	}
	l.sent.Add(1)
	return nil
}

func (l *Link) writeFrame(frame []byte) error {
	select {
	case <-l.done:
		return fmt.Errorf("link to %s is down: %w", l.peer.name, l.closeErr)
	default:
	}
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	if l.relay != nil {
		if len(frame) == 4 {
			return nil // a tick: the process that owns the socket ticks
		}
		return l.relay(frame)
	}
	// A peer that stops reading (a paused or wedged node) must not hold
	// our writers forever: past the deadline the link is declared dead.
	_ = l.conn.SetWriteDeadline(time.Now().Add(l.writeTimeout))
	if _, err := l.conn.Write(frame); err != nil {
		l.closeWith(fmt.Errorf("write: %w", err))
		return err
	}
	l.lastWrite.Store(time.Now().UnixNano())
	return nil
}

// tickLoop keeps the link alive: Erlang drops a connection that has been
// silent for net_ticktime, so we send an empty frame whenever we have been
// quiet for a tick interval.
func (l *Link) tickLoop(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-t.C:
			if time.Since(time.Unix(0, l.lastWrite.Load())) >= interval {
				_ = l.writeFrame([]byte{0, 0, 0, 0})
			}
		}
	}
}

// readLoop reads frames until the link fails. silence is how long the peer
// may say nothing (it ticks every net_ticktime/4) before we give up on it.
func (l *Link) readLoop(silence time.Duration) {
	var head [4]byte
	for {
		// A frame boundary: a takeover stops the reader here, even while
		// frames keep coming (the deadline below would undo its own).
		if l.pausing.Load() && l.parkReader(nil) {
			return
		}
		_ = l.conn.SetReadDeadline(time.Now().Add(silence))
		if got, err := io.ReadFull(l.reader, head[:]); err != nil {
			if l.parkReader(head[:got]) {
				return
			}
			l.closeWith(fmt.Errorf("read: %w", err))
			return
		}
		n := binary.BigEndian.Uint32(head[:])
		if n == 0 {
			continue // a tick
		}
		if n > maxFrame {
			l.closeWith(fmt.Errorf("frame of %d bytes exceeds the limit", n))
			return
		}
		frame := make([]byte, n)
		if got, err := io.ReadFull(l.reader, frame); err != nil {
			if l.parkReader(append(head[:], frame[:got]...)) {
				return
			}
			l.closeWith(fmt.Errorf("read: %w", err))
			return
		}
		if err := l.dispatch(frame); err != nil {
			// A frame we cannot parse means the stream is no longer
			// trustworthy; carrying on could misroute later messages.
			l.log.Error("bad frame from peer, dropping link", zap.Error(err))
			l.closeWith(err)
			return
		}
	}
}

func (l *Link) dispatch(frame []byte) error {
	if frame[0] != passThrough {
		return fmt.Errorf("unsupported frame type %d", frame[0])
	}
	ctlTerm, rest, err := etf.Decode(frame[1:])
	if err != nil {
		return fmt.Errorf("control message: %w", err)
	}
	var payload etf.Term
	if len(rest) > 0 {
		if payload, rest, err = etf.Decode(rest); err != nil {
			return fmt.Errorf("payload: %w", err)
		}
		if len(rest) > 0 {
			return errors.New("trailing bytes after payload")
		}
	}
	ctl, ok := ctlTerm.(etf.Tuple)
	if !ok || len(ctl) == 0 {
		return errors.New("control message is not a tuple")
	}
	op, ok := etf.Int64(ctl[0])
	if !ok {
		return errors.New("control message without an operation")
	}
	l.received.Add(1)
	switch {
	case (op == opSend || op == opSendTT) && len(ctl) >= 3:
		to, _ := ctl[2].(etf.Pid)
		l.deliver(Delivery{To: to, Msg: payload})
	case (op == opSendSender || op == opSendSenderTT) && len(ctl) >= 3:
		from, _ := ctl[1].(etf.Pid)
		to, _ := ctl[2].(etf.Pid)
		l.deliver(Delivery{To: to, From: from, Msg: payload})
	case (op == opRegSend || op == opRegSendTT) && len(ctl) >= 4:
		from, _ := ctl[1].(etf.Pid)
		name, _ := ctl[3].(etf.Atom)
		l.deliverToName(name, from, payload)
	case op == opLink && len(ctl) == 3:
		l.onLink(ctl)
	case op == opUnlink && len(ctl) == 3:
		l.dropLink(ctl[1])
	case op == opUnlinkID && len(ctl) == 4:
		// OTP 26+ unlinks with an id and waits for our ack; the old
		// UNLINK would be a protocol error to them.
		l.dropLink(ctl[2])
		return l.writeMessage(etf.Tuple{opUnlinkIDAck, ctl[1], ctl[3], ctl[2]}, nil)
	case op == opUnlinkIDAck:
		// We never unlink, so there is nothing to complete.
	case op == opMonitorP && len(ctl) == 4:
		return l.onMonitor(ctl)
	case op == opDemonitorP && len(ctl) == 4:
		if ref, ok := ctl[3].(etf.Ref); ok {
			l.stateMu.Lock()
			delete(l.monitors, ref.String())
			l.stateMu.Unlock()
		}
	case op == opExit, op == opExitTT, op == opPayloadExit, op == opPayloadExitTT:
		// A linked Erlang process died: the link is gone. The sidecar's
		// process traps exits, so it gets {'EXIT', Pid, Reason}, as an
		// Erlang process that traps exits would.
		if len(ctl) < 3 {
			return nil
		}
		// EXIT is {3, From, To, Reason}, EXIT_TT {13, From, To, Token,
		// Reason}; the PAYLOAD_ forms carry the reason as the payload.
		reason := payload
		switch {
		case op == opExit && len(ctl) == 4:
			reason = ctl[3]
		case op == opExitTT && len(ctl) == 5:
			reason = ctl[4]
		case op == opExit || op == opExitTT:
			return fmt.Errorf("EXIT control message of %d elements", len(ctl))
		}
		l.dropLink(ctl[1])
		if to, ok := ctl[2].(etf.Pid); ok && to == l.node.self {
			l.handler(l, Delivery{To: to, Msg: etf.Tuple{etf.Atom("EXIT"), ctl[1], reason}})
		}
	case (op == opExit2 || op == opExit2TT || op == opPayloadExit2 || op == opPayloadExit2TT) && len(ctl) >= 2:
		// exit/2 aimed at the sidecar: noted, never fatal to the link or
		// to the client connections it carries.
		l.log.Info("exit signal from peer ignored", zap.Any("from", ctl[1]))
	case op == opMonitorPExit && len(ctl) == 5:
		l.monitorFired(ctl[1], ctl[2], ctl[3], ctl[4])
	case op == opPayloadMonitorPX && len(ctl) == 4:
		l.monitorFired(ctl[1], ctl[2], ctl[3], payload)
	case op == opGroupLeader:
		// The sidecar does no I/O through Erlang: no group leader to keep.
	default:
		l.log.Debug("unknown control message ignored", zap.Int64("op", op))
	}
	return nil
}

func (l *Link) deliver(d Delivery) {
	if d.To != l.node.self {
		// Erlang drops messages to processes that do not exist; so do we.
		l.log.Debug("message to unknown pid dropped", zap.Stringer("to", d.To))
		return
	}
	l.handler(l, d)
}

func (l *Link) deliverToName(name etf.Atom, from etf.Pid, msg etf.Term) {
	if name == "net_kernel" {
		l.answerNetKernel(msg)
		return
	}
	l.handler(l, Delivery{ToName: name, From: from, Msg: msg})
}

// answerNetKernel answers the one call Erlang makes to a peer's net_kernel:
// net_adm:ping/1 sends {'$gen_call', {From, Tag}, {is_auth, Node}}.
func (l *Link) answerNetKernel(msg etf.Term) {
	call, ok := msg.(etf.Tuple)
	if !ok || len(call) != 3 || call[0] != etf.Atom("$gen_call") {
		return
	}
	from, ok := call[1].(etf.Tuple)
	if !ok || len(from) != 2 {
		return
	}
	pid, ok := from[0].(etf.Pid)
	if !ok {
		return
	}
	if req, ok := call[2].(etf.Tuple); ok && len(req) == 2 && req[0] == etf.Atom("is_auth") {
		_ = l.Send(pid, etf.Tuple{from[1], etf.Atom("yes")})
	}
}

// ownsProcess reports whether t names a process that lives in the sidecar.
func (l *Link) ownsProcess(t etf.Term) bool {
	switch v := t.(type) {
	case etf.Pid:
		return v == l.node.self
	case etf.Atom:
		return v == "net_kernel"
	}
	return false
}

func (l *Link) onLink(ctl etf.Tuple) {
	from, ok1 := ctl[1].(etf.Pid)
	to, ok2 := ctl[2].(etf.Pid)
	if !ok1 || !ok2 {
		return
	}
	if !l.ownsProcess(to) {
		_ = l.writeMessage(etf.Tuple{opExit, to, from, etf.Atom("noproc")}, nil)
		return
	}
	l.stateMu.Lock()
	l.links[from] = struct{}{}
	l.stateMu.Unlock()
}

func (l *Link) dropLink(t etf.Term) {
	if pid, ok := t.(etf.Pid); ok {
		l.stateMu.Lock()
		delete(l.links, pid)
		l.stateMu.Unlock()
	}
}

func (l *Link) onMonitor(ctl etf.Tuple) error {
	from, ok1 := ctl[1].(etf.Pid)
	ref, ok2 := ctl[3].(etf.Ref)
	if !ok1 || !ok2 {
		return nil
	}
	if !l.ownsProcess(ctl[2]) {
		// Monitoring a process that does not exist fires at once.
		return l.writeMessage(etf.Tuple{opMonitorPExit, ctl[2], from, ref, etf.Atom("noproc")}, nil)
	}
	l.stateMu.Lock()
	l.monitors[ref.String()] = monitorEntry{from: from, ref: ref}
	l.stateMu.Unlock()
	return nil
}

// LinkTo links the sidecar's process to pid. If pid ends, the handler gets
// {'EXIT', Pid, Reason}; if the sidecar goes away, pid gets an exit signal
// (noconnection), which is how an Erlang process can tie its life to ours.
func (l *Link) LinkTo(pid etf.Pid) error {
	if err := l.writeMessage(etf.Tuple{opLink, l.node.self, pid}, nil); err != nil {
		return err
	}
	l.stateMu.Lock()
	l.links[pid] = struct{}{}
	l.stateMu.Unlock()
	return nil
}

// Unlink removes a link made by either side. OTP 26+ want it with an id
// (UNLINK_ID, which they acknowledge); the old UNLINK is what peers without
// DFLAG_UNLINK_ID understand.
func (l *Link) Unlink(pid etf.Pid) error {
	l.dropLink(pid)
	if l.peer.flags&flagUnlinkID != 0 {
		return l.writeMessage(etf.Tuple{opUnlinkID, l.unlinkIDs.Add(1), l.node.self, pid}, nil)
	}
	return l.writeMessage(etf.Tuple{opUnlink, l.node.self, pid}, nil)
}

// Monitor asks the peer to tell us when the process pid ends: the handler
// then gets {'DOWN', Ref, process, Pid, Reason}, as an Erlang process
// would. It also fires, with reason noproc, if pid is already gone. If the
// link itself drops, Done says so instead.
func (l *Link) Monitor(pid etf.Pid) (etf.Ref, error) {
	ref := l.node.makeRef()
	if err := l.writeMessage(etf.Tuple{opMonitorP, l.node.self, pid, ref}, nil); err != nil {
		return etf.Ref{}, err
	}
	return ref, nil
}

// monitorFired turns MONITOR_P_EXIT into the 'DOWN' message Erlang would
// put in the monitoring process's mailbox.
func (l *Link) monitorFired(from, to, ref, reason etf.Term) {
	pid, ok := to.(etf.Pid)
	if !ok || pid != l.node.self {
		return
	}
	l.handler(l, Delivery{To: pid, Msg: etf.Tuple{etf.Atom("DOWN"), ref, etf.Atom("process"), from, reason}})
}

// Watchers returns how many peer processes link to or monitor the sidecar.
func (l *Link) Watchers() (links, monitors int) {
	l.stateMu.Lock()
	defer l.stateMu.Unlock()
	return len(l.links), len(l.monitors)
}
