package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// ErrNotAttached means no shim session is up: ejabberd is down, the shim is
// not loaded, or the link is being re-established.
var ErrNotAttached = errors.New("not attached to the ejabberd shim")

// ErrLinkLost means the link went down while a request was in flight.
var ErrLinkLost = errors.New("link to ejabberd lost")

// AttachmentState is a snapshot of an attachment, for status and metrics.
type AttachmentState struct {
	Peer      string
	Attached  bool
	Since     time.Time // when the current state began
	Version   int       // negotiated protocol version
	Session   string    // the shim's session pid
	LastError string
	InFlight  int
	Attempts  uint64
	// Messages sent to and received from the node, over every link this
	// attachment has had (for metrics: a rate of these is events/s).
	Sent, Received uint64
}

// Attachment keeps the sidecar attached to the shim on one ejabberd node:
// it dials, says hello, serves requests, and when the link drops it fails
// what was in flight and re-attaches with backoff, until its context ends.
type Attachment struct {
	node *Node
	peer string
	log  *zap.Logger
	info etf.Hello

	mu        sync.Mutex
	cur       *session      // nil while detached
	ready     chan struct{} // closed when cur becomes non-nil
	lastErr   string
	since     time.Time
	pending   map[uint64]chan etf.BOSHResponse
	opens     map[uint64]chan any     // c2s_open awaiting its answer, by conn ID
	streams   map[uint64]*streamEntry // live client streams, by conn ID
	byMonitor map[string]uint64       // c2s monitors, by reference
	attempts  atomic.Uint64
	helloWait time.Duration
	// attachWait is how long a request waits for a detached attachment to
	// come back (a link being re-established) before it fails.
	attachWait time.Duration
	// messages over links already closed, so the totals survive re-attaching
	sentBefore, receivedBefore uint64

	// A takeover (handoff.go): the session paused for it, closed once the
	// link has moved, messages for connections we do not carry, streams
	// handed to us waiting for their sockets, and how Start begins.
	paused     *session
	handedOver chan struct{}
	forward    atomic.Pointer[func(Delivery)]
	adopted    map[uint64]*streamEntry
	startRun   func()
}

type session struct {
	link    *Link
	shim    etf.Pid
	version int
	token   []byte  // the session's secret, echoed in every message (version 3 on)
	monitor etf.Ref // our monitor on the shim's session process
}

// send sends msg to the shim's session, wrapped as its version wants.
func (s *session) send(msg etf.Term) error {
	return s.link.Send(s.shim, etf.FromSidecar(s.version, s.token, msg))
}

// Attach starts attaching to the shim on peer and keeps at it until ctx
// ends. It returns at once; use Wait or Process to use the attachment.
func (n *Node) Attach(ctx context.Context, peer string, build string) *Attachment {
	a := n.newAttachment(peer, build)
	go a.run(ctx)
	return a
}

func (n *Node) newAttachment(peer string, build string) *Attachment {
	return &Attachment{
		node:       n,
		peer:       peer,
		log:        n.log.With(zap.String("ejabberd", peer)),
		ready:      make(chan struct{}),
		since:      time.Now(),
		pending:    make(map[uint64]chan etf.BOSHResponse),
		opens:      make(map[uint64]chan any),
		streams:    make(map[uint64]*streamEntry),
		byMonitor:  make(map[string]uint64),
		handedOver: make(chan struct{}),
		adopted:    make(map[uint64]*streamEntry),
		helloWait:  5 * time.Second,
		attachWait: 5 * time.Second,
		info: etf.Hello{
			Sidecar:    n.self,
			Version:    etf.ProtocolVersion,
			MinVersion: etf.MinProtocolVersion,
			Name:       n.cfg.Name,
			Build:      build,
		},
	}
}

// Peer returns the ejabberd node this attachment serves.
func (a *Attachment) Peer() string { return a.peer }

// isSessionMonitor reports whether ref is our monitor on the current shim
// session.
func (a *Attachment) isSessionMonitor(ref etf.Ref) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cur != nil && a.cur.monitor.Equal(ref)
}

// Attached reports whether the shim session is up right now.
func (a *Attachment) Attached() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cur != nil
}

// State returns a snapshot for status reports.
func (a *Attachment) State() AttachmentState {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := AttachmentState{
		Peer:      a.peer,
		Attached:  a.cur != nil,
		Since:     a.since,
		LastError: a.lastErr,
		InFlight:  len(a.pending),
		Attempts:  a.attempts.Load(),
		Sent:      a.sentBefore,
		Received:  a.receivedBefore,
	}
	if a.cur != nil {
		s.Version = a.cur.version
		s.Session = a.cur.shim.String()
		sent, received := a.cur.link.Stats()
		s.Sent += sent
		s.Received += received
	}
	return s
}

// Wait blocks until the attachment is up or ctx ends.
func (a *Attachment) Wait(ctx context.Context) error {
	_, err := a.current(ctx)
	return err
}

func (a *Attachment) current(ctx context.Context) (*session, error) {
	a.mu.Lock()
	cur, ready := a.cur, a.ready
	a.mu.Unlock()
	if cur != nil {
		return cur, nil
	}
	select {
	case <-ready:
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.cur == nil {
			return nil, ErrNotAttached
		}
		return a.cur, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %s", ErrNotAttached, a.State().LastError)
	}
}

// ProcessBOSH hands one BOSH request to the shim and waits for ejabberd's
// answer. If ctx ends first (the client went away, or the sidecar's own
// deadline passed), the shim is told to drop the request; the client gets
// the same answer again by re-sending its rid, as with ejabberd's own
// listener.
func (a *Attachment) ProcessBOSH(ctx context.Context, req etf.BOSHRequest) (etf.BOSHResponse, error) {
	waitCtx, cancel := context.WithTimeout(ctx, a.attachWait)
	s, err := a.current(waitCtx)
	cancel()
	if err != nil {
		return etf.BOSHResponse{}, err
	}
	ch := make(chan etf.BOSHResponse, 1)
	a.mu.Lock()
	a.pending[req.ReqID] = ch
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.pending, req.ReqID)
		a.mu.Unlock()
	}()
	if err := s.send(req.Term()); err != nil {
		return etf.BOSHResponse{}, fmt.Errorf("%w: %v", ErrLinkLost, err)
	}
	etf.Sent(ctx) // the request is on the link: the next of its session may follow
	select {
	case resp := <-ch:
		return resp, nil
	case <-s.link.Done():
		return etf.BOSHResponse{}, ErrLinkLost
	case <-ctx.Done():
		_ = s.send(etf.BOSHCancel{ConnID: req.ConnID, ReqID: req.ReqID}.Term())
		return etf.BOSHResponse{}, ctx.Err()
	}
}

// handle runs on the link's reader goroutine: it must not block.
func (a *Attachment) handle(welcome chan<- any) Handler {
	return func(l *Link, d Delivery) {
		msg, err := etf.ParseShimMessage(d.Msg)
		if err != nil {
			a.log.Warn("message from ejabberd is no protocol message; ignored", zap.Error(err))
			return
		}
		switch m := msg.(type) {
		case etf.Down:
			if a.streamDown(m.Ref) {
				return // a c2s ended
			}
			if !a.isSessionMonitor(m.Ref) {
				a.forwardUnknown(d) // a c2s of the old process, or one we already forgot
				return
			}
			// The shim's session process ended (the shim was stopped or
			// reloaded) while the node stays up. Dropping the link fails
			// every request in flight at once and starts a fresh hello.
			a.log.Warn("the shim's session ended; re-attaching", zap.Any("reason", m.Reason))
			l.Close()
		case etf.ControlRequest:
			a.startControl(l, m)
		case etf.C2SStarted, etf.C2SRefused, etf.C2SOut, etf.C2SClose, etf.C2SShaper:
			if !a.handleStreamMessage(m) {
				a.forwardUnknown(d)
			}
		case etf.BOSHResponse:
			a.mu.Lock()
			ch := a.pending[m.ReqID]
			a.mu.Unlock()
			if ch == nil && a.forwardUnknown(d) {
				return // the old process's request
			}
			if ch == nil {
				// The request was cancelled or timed out; the client
				// re-sends the rid and ejabberd replays the answer.
				a.log.Debug("late BOSH response dropped", zap.Uint64("req", m.ReqID))
				return
			}
			ch <- m // buffered, and only one response per request
		case etf.Welcome, etf.Refused:
			select {
			case welcome <- m:
			default:
			}
		}
	}
}

func (a *Attachment) run(ctx context.Context) {
	backoff := newBackoff(100*time.Millisecond, 5*time.Second)
	for {
		err := a.attachOnce(ctx, backoff)
		if errors.Is(err, errHandedOver) || a.isHandedOver() {
			return
		}
		if ctx.Err() != nil {
			a.setDetached("stopped")
			return
		}
		a.setDetached(err.Error())
		select {
		case <-ctx.Done():
			a.setDetached("stopped")
			return
		case <-a.handedOver:
			return // the new process attaches for itself
		case <-time.After(backoff.next()):
		}
	}
}

// attachOnce dials, says hello, and serves until the link drops. It returns
// why the attachment ended.
func (a *Attachment) attachOnce(ctx context.Context, backoff *backoff) error {
	a.attempts.Add(1)
	welcome := make(chan any, 1)
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	link, err := a.node.dialPeer(dialCtx, a.peer, a.handle(welcome))
	cancel()
	if err != nil {
		return err
	}
	defer link.Close()
	if err := link.RegSend(etf.ListenerName, a.info.Term()); err != nil {
		return err
	}
	var w etf.Welcome
	select {
	case m := <-welcome:
		switch m := m.(type) {
		case etf.Welcome:
			w = m
		case etf.Refused:
			return fmt.Errorf("shim refused us: %s (it speaks versions %v)", m.Reason, m.Supported)
		}
	case <-link.Done():
		return link.Err()
	case <-time.After(a.helloWait):
		return fmt.Errorf("no answer from %s on %s: is the shim loaded? (megaphone:start() in its shell)",
			etf.ListenerName, a.peer)
	case <-ctx.Done():
		return ctx.Err()
	}
	// Watch the session process: if the shim goes away without the node
	// going down, requests waiting on it must not hang.
	ref, err := link.Monitor(w.Session)
	if err != nil {
		return err
	}
	s := &session{link: link, shim: w.Session, version: w.Version, token: w.Token, monitor: ref}
	a.setAttached(s, w)
	backoff.reset()
	return a.serve(ctx, s)
}

// serve waits until the session's link drops or ctx ends, and ends the
// session's streams. After a takeover the link relays through the new
// process, and the attachment ends with it instead of re-attaching.
func (a *Attachment) serve(ctx context.Context, s *session) error {
	select {
	case <-s.link.Done():
		a.dropStreams(s, "remote-connection-failed")
		return fmt.Errorf("link down: %w", s.link.Err())
	case <-ctx.Done():
		select {
		case <-a.handedOver:
		default:
			a.dropStreams(s, "system-shutdown")
			return ctx.Err()
		}
	case <-a.handedOver:
	}
	<-s.link.Done()
	a.dropStreams(s, "remote-connection-failed") // the new process went away
	return errHandedOver
}

func (a *Attachment) setAttached(s *session, w etf.Welcome) {
	a.mu.Lock()
	a.cur = s
	a.since = time.Now()
	a.lastErr = ""
	close(a.ready)
	a.mu.Unlock()
	a.log.Info("attached to the shim",
		zap.Int("protocol", w.Version), zap.Stringer("session", w.Session),
		zap.String("otp", w.OTP), zap.String("ejabberd_version", w.Ejabberd))
}

// setDetached records why we are detached. Each distinct reason is logged
// once, so a node that stays down for an hour does not flood the log.
func (a *Attachment) setDetached(reason string) {
	a.mu.Lock()
	wasAttached := a.cur != nil
	repeated := reason == a.lastErr
	if wasAttached {
		sent, received := a.cur.link.Stats()
		a.sentBefore += sent
		a.receivedBefore += received
		a.cur = nil
		a.ready = make(chan struct{})
		a.since = time.Now()
	}
	a.lastErr = reason
	a.mu.Unlock()
	switch {
	case reason == "stopped":
		a.log.Info("detached from the shim: the sidecar is stopping")
	case wasAttached:
		a.log.Warn("detached from the shim; re-attaching", zap.String("reason", reason))
	case !repeated:
		a.log.Warn("cannot attach to the shim; retrying with backoff", zap.String("reason", reason))
	}
}

// backoff is exponential with jitter, so that many sidecars restarting
// together do not hammer ejabberd in step.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max, cur: min} }

func (b *backoff) reset() { b.cur = b.min }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return d/2 + rand.N(d/2+1)
}
