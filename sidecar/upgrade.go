package sidecar

// Hot upgrade without dropping clients. The running sidecar offers its
// state on a unix socket (--handoff-socket); a new binary started with
// --takeover connects there and receives, over SCM_RIGHTS, the
// distribution link's socket, the listening sockets and the sockets of
// the plain XMPP streams, with the state that goes with them (msgpack).
// ejabberd sees the same node, the same pids and the same TCP connection
// throughout: no 'DOWN', no noconnection, every c2s runs on. What cannot
// move (TLS streams, BOSH requests being held) stays in
// the old process, whose link relays through the new one until they end.
// docs/ARCHITECTURE.md, "Hot upgrade", has the why of each step.

import (
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

	"github.com/megaphone-im/megaphone/bosh"
	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sockets"
	"github.com/vmihailenco/msgpack/v5"
	"go.uber.org/zap"
)

// handoffVersion is what both processes must speak; a takeover by a
// binary that speaks another is refused before anything stops.
const handoffVersion = "megaphone-handoff-1"

// idGap separates the new process's connection and request IDs from the
// old one's, which goes on numbering the requests that still reach it
// (on its open HTTP connections) after the handoff: ejabberd's answers
// are routed by ID, and two processes must never both wait for one.
const idGap = 1 << 32

// handoffTimeout bounds one takeover from hello to go.
const handoffTimeout = 30 * time.Second

// Listener roles, the same in both processes.
const (
	roleC2S    = "c2s"
	roleC2STLS = "c2s_tls"
	roleHTTP   = "http"
)

// handoffState is what the old process sends, before the descriptors:
// one per attached link, then one per listener, then one per stream.
type handoffState struct {
	Identity   node.Identity
	LastConnID uint64
	LastReqID  uint64
	// Runtime state set from ejabberd's shell carries over; SIGHUP makes
	// the new process read its config file's limits again.
	Limits      sockets.Limits
	Draining    bool
	Attachments []node.AttachmentHandoff
	Listeners   []string
	Streams     []sockets.StreamState
	// Each BOSH session's rid order: the new front holds a session's
	// requests until those the old process still sends are out.
	BOSHOrder []bosh.SessionOrder
}

// upgradeState is the sidecar's side of hot upgrades.
type upgradeState struct {
	inherited map[string]net.Listener      // takeover: listening sockets by role
	byRole    map[string]*sockets.Listener // the listeners serving now
	taken     *takenOver                   // takeover: what Run still starts
	// predecessor is closed when the process we took over from has ended:
	// until then its relayed connections need us, even once we have
	// handed over in turn (nil: we took over from nobody).
	predecessor chan struct{}
	handedOver  chan struct{} // closed once a new process took over
	relay       *net.UnixConn // after a handoff: the way to the new process
	serveErr    chan error    // where listeners report failure
	stopAdmin   func()        // frees the admin address for the new process
}

// takenOver is what a takeover received and Run starts once the BOSH
// front and the stream backend exist.
type takenOver struct {
	uc      *net.UnixConn
	state   handoffState
	streams []net.Conn
	pause   time.Time
}

// HandedOver is closed once a new process has taken this one's sockets.
func (s *Sidecar) HandedOver() <-chan struct{} { return s.upgrade.handedOver }

// listen opens the listener for role, or carries on the one inherited.
func (s *Sidecar) listen(role, addr string, streams bool) (*sockets.Listener, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var lis *sockets.Listener
	if inner := s.upgrade.inherited[role]; inner != nil {
		delete(s.upgrade.inherited, role)
		lis = sockets.AdoptListener(inner, s.registry, s.log, streams)
	} else {
		var err error
		lc := sockets.ListenConfig{ReusePort: s.cfg.ReusePort, KeepAlive: s.cfg.TCPKeepAlive}
		if streams {
			lis, err = lc.ListenStreams(addr, s.registry, s.log)
		} else {
			lis, err = lc.Listen(addr, s.registry, s.log)
		}
		if err != nil {
			return nil, err
		}
	}
	if s.upgrade.byRole == nil {
		s.upgrade.byRole = make(map[string]*sockets.Listener)
	}
	s.upgrade.byRole[role] = lis
	return lis, nil
}

// offerHandoff listens on the handoff socket, if one is configured, and
// hands everything to the first process that completes a takeover.
func (s *Sidecar) offerHandoff(ctx context.Context) error {
	path := s.cfg.HandoffSocket
	if path == "" {
		return nil
	}
	_ = os.Remove(path) // a socket file left by an earlier run
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("handoff socket: %w", err)
	}
	// Closing must not unlink it: after a takeover the path is the new
	// process's, offered in turn.
	lis.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return fmt.Errorf("handoff socket: %w", err)
	}
	s.log.Info("a new sidecar may take over on the handoff socket", zap.String("path", path))
	go func() {
		select {
		case <-ctx.Done():
			_ = os.Remove(path)
		case <-s.upgrade.handedOver:
			// The path is the new process's now: it offers it in turn.
		}
		lis.Close()
	}()
	go func() {
		for {
			uc, err := lis.AcceptUnix()
			if err != nil {
				return
			}
			if err := s.handOver(uc); err != nil {
				s.log.Error("takeover failed; carrying on", zap.Error(err))
				uc.Close()
				continue
			}
			return
		}
	}()
	return nil
}

// handOver gives the listeners, the links and the plain streams to the
// process on uc. Until that process has everything and says so, nothing is
// lost by stopping: on any failure before that, this process carries on.
// errEdgeNoTakeover refuses a hot upgrade of a sidecar in BOSH edge mode.
var errEdgeNoTakeover = errors.New("hot upgrade refused: --bosh-mode edge keeps BOSH sessions in this process and they cannot move yet; restart the sidecar instead (its BOSH clients get a system-shutdown terminate)")

func (s *Sidecar) handOver(uc *net.UnixConn) error {
	if err := peerIsUs(uc); err != nil {
		return err
	}
	_ = uc.SetDeadline(time.Now().Add(handoffTimeout))
	kind, hello, err := readHandoffFrame(uc)
	if err != nil {
		return err
	}
	if kind != frameTakeover || string(hello) != handoffVersion {
		return fmt.Errorf("takeover speaks %q, we speak %q", hello, handoffVersion)
	}
	if s.cfg.BOSHMode == BOSHEdge {
		// An edge BOSH session lives in this process (its rid window,
		// held requests, c2s's output not yet answered), and nothing
		// carries it to another yet: refuse before anything stops, so
		// no client notices; the operator restarts instead.
		return errEdgeNoTakeover
	}
	s.log.Info("takeover: handing over to a new process")
	started := time.Now()

	// Stop taking connections; the new process accepts what queues meanwhile.
	files, roles, err := s.detachListeners()
	if err != nil {
		return err
	}
	committed := false
	var paused []*node.Attachment
	var moving []*sockets.MovingStream
	defer func() {
		if !committed {
			// The new process touched nothing: carry on as before.
			s.log.Info("takeover: resuming what was paused", zap.Int("links", len(paused)), zap.Int("streams", len(moving)))
			for _, a := range paused {
				a.Resume()
			}
			for _, m := range moving {
				m.Resume()
			}
			s.front.KeepOrder()
			s.reattachListeners(files, roles)
		}
		for _, f := range files {
			f.Close()
		}
	}()

	// Readers stop at a stanza boundary, then the links at a frame
	// boundary, then the writers: nothing more can be queued for them.
	moving = s.registry.PauseStreams(2 * time.Second)
	ids := make([]uint64, len(moving))
	for i, m := range moving {
		ids[i] = m.State.ConnID
	}
	var states []node.AttachmentHandoff
	for _, a := range s.attached {
		st, err := a.Pause(ids)
		if err != nil {
			return err
		}
		paused = append(paused, a)
		states = append(states, st)
	}
	moved, stay := stopWriters(moving, states)

	// With the links paused no BOSH request goes out: the rid order is
	// what ejabberd has had.
	state := handoffState{Identity: s.node.Identity(), LastConnID: s.registry.LastID(),
		LastReqID: s.front.LastRequestID(), Limits: s.registry.Limits(), Draining: s.registry.Draining(),
		Attachments: states, Listeners: roles, BOSHOrder: s.front.HandOverOrder()}
	var fds []int
	for _, a := range s.attached {
		if c := a.PausedConn(); c != nil {
			fd, err := rawFD(c)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
		}
	}
	for _, f := range files {
		fd, err := rawFD(f)
		if err != nil {
			return err
		}
		fds = append(fds, fd)
	}
	for _, m := range moved {
		fd, err := rawFD(m.Socket())
		if err != nil {
			return err
		}
		fds = append(fds, fd)
		state.Streams = append(state.Streams, m.State)
	}
	blob, err := msgpack.Marshal(&state)
	if err != nil {
		return err
	}
	if err := writeHandoffFrame(uc, frameState, blob); err != nil {
		return err
	}
	if err := sendFDs(uc, fds); err != nil {
		return err
	}
	if kind, _, err := readHandoffFrame(uc); err != nil || kind != frameAck {
		return fmt.Errorf("the new process did not take the state: %v", err)
	}

	// The point of no return: the new process starts on frameGo.
	committed = true
	s.upgrade.stopAdmin()
	if err := writeHandoffFrame(uc, frameGo, nil); err != nil {
		s.log.Error("takeover: the new process went away at the last step", zap.Error(err))
	}
	_ = uc.SetDeadline(time.Time{})
	s.upgrade.relay = uc
	// The old process's writes to ejabberd wait on the new process as
	// they would on the link (its write timeout).
	out := &relayWriter{uc: uc, timeout: 30 * time.Second}
	// Before the links relay: a BOSH request's report follows its frame.
	s.front.ReportTo(out.ridEvent)
	movedIDs := make([]uint64, len(moved))
	for i, m := range moved {
		movedIDs[i] = m.State.ConnID
	}
	for i, a := range s.attached {
		a.RelayThrough(movedIDs, out.distFrames(i))
	}
	for _, m := range moved {
		m.Moved()
	}
	for _, m := range stay {
		m.Resume()
	}
	go s.relayFromNew(uc)
	s.log.Info("takeover: handed over", zap.Int("streams_moved", len(moved)), zap.Int("streams_staying", len(stay)),
		zap.Int("listeners", len(roles)), zap.Duration("paused", time.Since(started)))
	close(s.upgrade.handedOver)
	return nil
}

// stopWriters stops the writers of the paused streams that can move: those
// whose c2s the attachments handed over, and whose client reads. The
// others stay, and leave the attachments' lists.
func stopWriters(moving []*sockets.MovingStream, states []node.AttachmentHandoff) (moved, stay []*sockets.MovingStream) {
	listed := make(map[uint64]*node.AttachmentHandoff)
	for i := range states {
		for _, sh := range states[i].Streams {
			listed[sh.ConnID] = &states[i]
		}
	}
	for _, m := range moving {
		st := listed[m.State.ConnID]
		if st != nil && m.StopWriting(2*time.Second) == nil {
			moved = append(moved, m)
			continue
		}
		stay = append(stay, m)
		if st != nil {
			kept := st.Streams[:0]
			for _, sh := range st.Streams {
				if sh.ConnID != m.State.ConnID {
					kept = append(kept, sh)
				}
			}
			st.Streams = kept
		}
	}
	return moved, stay
}

// detachListeners duplicates each listening socket (to send) and closes
// ours: no more accepts here. HTTP connections are closed after their
// next answer from now on.
func (s *Sidecar) detachListeners() ([]*os.File, []string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var files []*os.File
	var roles []string
	for role, lis := range s.upgrade.byRole {
		f, err := sockets.ListenerFD(lis)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, nil, err
		}
		files = append(files, f)
		roles = append(roles, role)
	}
	for _, lis := range s.upgrade.byRole {
		_ = lis.Close()
	}
	s.upgrade.byRole = nil
	s.listeners = nil
	// HTTP connections close after their next answer, so clients open
	// their next ones to the new process.
	s.front.CloseConnections(true)
	return files, roles, nil
}

// reattachListeners serves again on the listening sockets detachListeners
// duplicated (a takeover that failed).
func (s *Sidecar) reattachListeners(files []*os.File, roles []string) {
	s.front.CloseConnections(false)
	s.mu.Lock()
	s.upgrade.inherited = make(map[string]net.Listener)
	for i, f := range files {
		// The same listening socket: what queued meanwhile is still there.
		if lis, err := net.FileListener(f); err == nil {
			s.upgrade.inherited[roles[i]] = lis
		} else {
			s.log.Error("takeover undone: a listener could not be taken back; listening afresh", zap.Error(err))
		}
	}
	s.mu.Unlock()
	if err := s.serveStreams(s.upgrade.serveErr); err != nil {
		s.upgrade.serveErr <- err
	}
	if err := s.serveHTTP(s.upgrade.serveErr); err != nil {
		s.upgrade.serveErr <- err
	}
}

// relayWriter sends frames to the other process; its writes come from
// many goroutines. A process that stops reading must not hold ours for
// long: past timeout the relay is given up (the connection closed).
type relayWriter struct {
	mu      sync.Mutex
	uc      *net.UnixConn
	timeout time.Duration
}

func (r *relayWriter) send(kind byte, index int, payload []byte) error {
	b := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(payload)), uint16(index))
	return r.write(kind, append(b, payload...))
}

func (r *relayWriter) write(kind byte, payload []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = r.uc.SetWriteDeadline(time.Now().Add(r.timeout))
	err := writeHandoffFrame(r.uc, kind, payload)
	if err != nil {
		r.uc.Close()
	}
	return err
}

// ridEvent tells the new process what became of a BOSH request of ours.
// RIDSent follows the request's own frame on the socket, and the new
// process writes that to ejabberd before it reads this one.
func (r *relayWriter) ridEvent(e bosh.RIDEvent) { _ = r.write(frameRIDEvent, ridEventPayload(e)) }

// ridEventPayload is a frameRIDEvent's payload: kind, rid, sid.
func ridEventPayload(e bosh.RIDEvent) []byte {
	b := binary.BigEndian.AppendUint64([]byte{byte(e.Kind)}, e.RID)
	return append(b, e.SID...)
}

// parseRIDEvent reads ridEventPayload; ok is false if it is too short.
func parseRIDEvent(p []byte) (e bosh.RIDEvent, ok bool) {
	if len(p) < 9 {
		return e, false
	}
	return bosh.RIDEvent{Kind: bosh.RIDEventKind(p[0]), RID: binary.BigEndian.Uint64(p[1:9]), SID: string(p[9:])}, true
}

// distFrames is what the old process's link of attachment index writes
// through.
func (r *relayWriter) distFrames(index int) func(frame []byte) error {
	return func(frame []byte) error { return r.send(frameDistOut, index, frame) }
}

// relayFromNew runs in the old process: it hands its attachments what the
// new one passes back, until the new one goes away.
func (s *Sidecar) relayFromNew(uc *net.UnixConn) {
	reason := "the new sidecar process went away"
	for {
		kind, payload, err := readHandoffFrame(uc)
		if err != nil || len(payload) < 2 {
			break
		}
		i := int(binary.BigEndian.Uint16(payload))
		if i >= len(s.attached) {
			continue
		}
		switch kind {
		case frameDeliver:
			t, _, err := etf.Decode(payload[2:])
			if tuple, ok := t.(etf.Tuple); err == nil && ok && len(tuple) == 2 {
				from, _ := tuple[0].(etf.Pid)
				s.attached[i].DeliverRelayed(node.Delivery{To: s.node.Self(), From: from, Msg: tuple[1]})
			}
		case frameLinkEnded:
			s.attached[i].RelayEnded("the new process's link to ejabberd went down")
		}
	}
	for _, a := range s.attached {
		a.RelayEnded(reason)
	}
}

// lingerAfterHandoff runs in the old process once a new one took over:
// what stayed here (TLS streams, BOSH requests being held) ends on its
// own, within the configured linger at most; then the process exits.
func (s *Sidecar) lingerAfterHandoff(ctx context.Context) {
	s.registry.SetDraining(true)
	deadline := time.Now().Add(s.cfg.HandoffLinger)
	// Bounded by the linger: one check a second, the first once the moved
	// streams' goroutines here have let go of them.
	for i := 0; ctx.Err() == nil && time.Now().Before(deadline); i++ {
		time.Sleep(time.Second)
		open := s.registry.Stats().Open
		if open == 0 && s.predecessorEnded() {
			break
		}
		if i%10 == 0 {
			s.log.Info("after the takeover: connections still here", zap.Int("open", open),
				zap.Duration("left", time.Until(deadline).Round(time.Second)))
		}
	}
	if open := s.registry.Stats().Open; open > 0 {
		s.log.Info("ending the connections left after the takeover", zap.Int("open", open))
		s.registry.EndAll("system-shutdown")
		time.Sleep(200 * time.Millisecond) // lets the stream errors reach the clients
	}
	s.mu.Lock()
	srv := s.httpSrv
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
	if s.upgrade.relay != nil {
		s.upgrade.relay.Close()
	}
	s.log.Info("the new process has everything; exiting")
}

// predecessorEnded reports whether the process this one took over from
// (if any) has ended: its relayed connections go through us.
func (s *Sidecar) predecessorEnded() bool {
	if s.upgrade.predecessor == nil {
		return true
	}
	select {
	case <-s.upgrade.predecessor:
		return true
	default:
		return false
	}
}

// takeOver runs in the new process, before anything listens or dials: it
// receives the old process's state and sockets, and builds the node and
// its attachments from them. Nothing runs until startTakenOver.
func (s *Sidecar) takeOver(ctx context.Context) error {
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := (&net.Dialer{}).DialContext(dialCtx, "unix", s.cfg.Takeover)
	cancel()
	if err != nil {
		return fmt.Errorf("takeover: %w", err)
	}
	uc := c.(*net.UnixConn)
	fail := func(err error) error {
		uc.Close()
		return fmt.Errorf("takeover: %w", err)
	}
	if err := peerIsUs(uc); err != nil {
		return fail(err)
	}
	_ = uc.SetDeadline(time.Now().Add(handoffTimeout))
	if err := writeHandoffFrame(uc, frameTakeover, []byte(handoffVersion)); err != nil {
		return fail(err)
	}
	kind, blob, err := readHandoffFrame(uc)
	if err != nil {
		return fail(fmt.Errorf("no state from the running sidecar: %w", err))
	}
	pause := time.Now()
	var state handoffState
	if kind != frameState {
		return fail(errors.New("the running sidecar sent no state"))
	}
	if err := msgpack.Unmarshal(blob, &state); err != nil {
		return fail(err)
	}
	links := 0
	for _, a := range state.Attachments {
		if a.Attached {
			links++
		}
	}
	fds, err := receiveFDs(uc, links+len(state.Listeners)+len(state.Streams))
	if err != nil {
		return fail(err)
	}
	// Every descriptor becomes a connection or listener before anything
	// is acknowledged; on failure they are all closed (which the peer,
	// holding its own copies, does not notice).
	var closers []func() error
	undo := func(err error) error {
		for _, c := range closers {
			_ = c()
		}
		return fail(err)
	}
	conns := make([]net.Conn, 0, links+len(state.Streams))
	inherited := make(map[string]net.Listener)
	for i, fd := range fds {
		var closer io.Closer
		if i < links || i >= links+len(state.Listeners) {
			var conn net.Conn
			if conn, err = fileConn(fd, "handed-over socket"); err == nil {
				conns, closer = append(conns, conn), conn
			}
		} else {
			var lis net.Listener
			if lis, err = fileListener(fd, "handed-over listener"); err == nil {
				inherited[state.Listeners[i-links]], closer = lis, lis
			}
		}
		if err != nil {
			for _, fd := range fds[i+1:] {
				_ = syscall.Close(fd)
			}
			return undo(err)
		}
		closers = append(closers, closer.Close)
	}
	n, err := node.Restore(s.nodeConfig(), state.Identity)
	if err != nil {
		return undo(err)
	}
	if err := writeHandoffFrame(uc, frameAck, nil); err != nil {
		return undo(err)
	}
	if kind, _, err := readHandoffFrame(uc); err != nil || kind != frameGo {
		return undo(fmt.Errorf("the running sidecar did not let go: %v", err))
	}
	_ = uc.SetDeadline(time.Time{})

	s.node = n
	s.registry.ContinueIDs(state.LastConnID + idGap)
	s.registry.SetLimits(state.Limits)
	s.registry.SetDraining(state.Draining)
	k := 0
	for _, st := range state.Attachments {
		var conn net.Conn
		if st.Attached {
			conn = conns[k]
			k++
		}
		s.attached = append(s.attached, n.Adopt(ctx, st, conn, s.cfg.Version))
	}
	s.mu.Lock()
	s.upgrade.inherited = inherited
	s.mu.Unlock()
	s.upgrade.taken = &takenOver{uc: uc, state: state, streams: conns[k:], pause: pause}
	s.log.Info("took over the running sidecar's node", zap.String("name", state.Identity.Name),
		zap.Int("links", links), zap.Int("listeners", len(inherited)), zap.Int("streams", len(state.Streams)))
	return nil
}

// startTakenOver runs what takeOver received: streams first (so that
// c2s's output for them finds them), then the links' readers, then the
// relay for the old process's connections.
func (s *Sidecar) startTakenOver() {
	t := s.upgrade.taken
	if t == nil {
		return
	}
	s.upgrade.taken = nil
	s.front.ContinueRequestIDs(t.state.LastReqID + idGap)
	s.front.AdoptOrder(t.state.BOSHOrder)
	s.front.SetDraining(t.state.Draining) // the shim knows already
	// What the new process passes back is written on its link's reader:
	// an old process that does not take it within seconds is given up.
	out := &relayWriter{uc: t.uc, timeout: 5 * time.Second}
	s.upgrade.predecessor = make(chan struct{})
	for i, a := range s.attached {
		a.ForwardUnknown(func(d node.Delivery) {
			term, err := etf.Encode(etf.Tuple{d.From, d.Msg})
			if err == nil {
				err = out.send(frameDeliver, i, term)
			}
			if err != nil {
				s.log.Debug("message for the old process not passed on", zap.Error(err))
			}
		})
	}
	for i, st := range t.state.Streams {
		var err error
		switch st.Transport {
		case "websocket":
			err = sockets.AdoptWebSocket(s.registry, s.wsConfig(), s.streams, st, t.streams[i])
		default:
			err = sockets.AdoptC2S(s.registry, s.c2sConfig(), s.streams, st, t.streams[i])
		}
		if err != nil {
			s.log.Error("takeover: a stream could not carry on", zap.Uint64("conn", st.ConnID), zap.Error(err))
		}
	}
	for i, a := range s.attached {
		a.Start()
		if done := a.LinkDone(); done != nil {
			go func() {
				<-done
				_ = out.send(frameLinkEnded, i, nil)
			}()
		}
	}
	go func() {
		// Frames the old process writes for what stayed with it; the end of
		// the socket is the end of the old process.
		for {
			kind, payload, err := readHandoffFrame(t.uc)
			if err != nil {
				break
			}
			switch {
			case kind == frameDistOut && len(payload) >= 2:
				if i := int(binary.BigEndian.Uint16(payload)); i < len(s.attached) {
					_ = s.attached[i].WriteRelayedFrame(payload[2:])
				}
			case kind == frameRIDEvent:
				if e, ok := parseRIDEvent(payload); ok {
					s.front.Elsewhere(e)
				}
			}
		}
		for _, a := range s.attached {
			a.ForwardUnknown(nil)
		}
		s.front.ElsewhereEnded()
		t.uc.Close()
		close(s.upgrade.predecessor)
		s.log.Info("the old sidecar process has ended")
	}()
	s.log.Info("took over: running", zap.Int("streams", len(t.state.Streams)),
		zap.Duration("paused", time.Since(t.pause)))
}

// AdoptStream finds the attachment that carried a moved stream's c2s.
func (b *streamBackend) AdoptStream(connID uint64, sink sockets.StreamSink) (sockets.Stream, bool) {
	for _, a := range b.nodes {
		if st, ok := a.AdoptStream(connID, sink); ok {
			return st, true
		}
	}
	return nil, false
}

// rawFD returns a socket's descriptor without duplicating it; it stays
// valid while the socket is open.
func rawFD(c any) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("%T has no descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := raw.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, err
	}
	return fd, nil
}
