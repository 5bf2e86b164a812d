package bosh

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
)

// Node is one ejabberd node the front can send requests to (in practice a
// node.Attachment).
type Node interface {
	Backend
	// Peer names the node, for logs and status.
	Peer() string
	// Attached reports whether the node can take a request right now.
	Attached() bool
}

// errNoNode means no ejabberd node is attached at all.
var errNoNode = errors.New("no ejabberd node attached")

// sessionTTL is how long the router remembers which node owns a session it
// has not heard from. It must exceed the longest BOSH inactivity plus wait
// ejabberd allows; a forgotten session still works (see route), it only
// loses its direct route.
const sessionTTL = 15 * time.Minute

// router places new BOSH sessions across the attached ejabberd nodes and
// sends every later request of a session to the node that owns it, so a
// cluster behaves as one server and a node that goes down takes only its
// own sessions with it.
type router struct {
	nodes []Node
	next  atomic.Uint64

	// order keeps each session's requests in rid order (order.go).
	order *ridOrder

	mu     sync.Mutex
	owners map[string]owner // by sid
	sweeps int
}

type owner struct {
	node     int
	lastSeen time.Time
	jid      string // bound by ejabberd, once it has answered the bind

	rate requestRate // the session's request allowance (admit)
}

// requestRate is a session's request allowance: a token bucket of perSec
// tokens refilled at perSec a second, and whether the session has been
// cut for going over it (once cut, it stays cut).
type requestRate struct {
	tokens   float64
	refilled time.Time
	cut      bool
}

// take takes one request from the allowance. It reports whether the
// request may go on, and whether this is the request that cut the session
// (the first over the rate).
func (r *requestRate) take(perSec int, now time.Time) (ok, cutNow bool) {
	switch {
	case r.cut:
		return false, false
	case r.refilled.IsZero():
		r.tokens = float64(perSec)
	default:
		r.tokens = min(float64(perSec), r.tokens+now.Sub(r.refilled).Seconds()*float64(perSec))
	}
	r.refilled = now
	if r.tokens < 1 {
		r.cut = true
		return false, true
	}
	r.tokens--
	return true, false
}

// admit takes one request of session sid from its allowance of perSec
// requests a second, in bursts of up to perSec. It reports whether the
// request may go on, and whether this is the request that cut the session
// (the first over the rate); a session once cut stays cut. Sessions the
// router does not know (not yet opened through it, or forgotten) are not
// counted: ejabberd answers for those, and a client cannot grow the table
// by making up sids.
func (r *router) admit(sid string, perSec int, now time.Time) (ok, cutNow bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	o, known := r.owners[sid]
	if !known {
		return true, false
	}
	ok, cutNow = o.rate.take(perSec, now)
	r.owners[sid] = o
	return ok, cutNow
}

func newRouter(nodes []Node) *router {
	return &router{nodes: nodes, owners: make(map[string]owner), order: newRIDOrder()}
}

// route forwards one request and learns from the answer. It returns the
// answer and the sid of the session the request belongs to ("" if none).
func (r *router) route(ctx context.Context, req etf.BOSHRequest, info bodyInfo) (etf.BOSHResponse, string, error) {
	i, err := r.pick(ctx, info.SID)
	if err != nil {
		return etf.BOSHResponse{}, info.SID, err
	}
	sent, err := r.order.enter(ctx, info.SID, info.RID)
	if err != nil {
		return etf.BOSHResponse{}, info.SID, err
	}
	resp, err := r.nodes[i].ProcessBOSH(etf.WithSent(ctx, sent), req)
	sent() // in case the backend did not say
	if err != nil {
		return resp, info.SID, err
	}
	sid, terminate := responseRoot(resp.Body)
	switch {
	case info.Terminate || terminate:
		r.forget(info.SID)
		r.order.forget(info.SID)
	case info.SID == "" && sid != "":
		r.remember(sid, i, resp.Body)
		r.order.opened(sid, info.RID)
	case info.SID != "":
		sid = info.SID
		r.remember(sid, i, resp.Body)
	}
	return resp, sid, nil
}

// pick chooses the node for a request: the owner of its session if known;
// otherwise (a new session, or one opened before this sidecar started) the
// next attached node in turn. ejabberd keeps BOSH sessions in a
// cluster-wide table, so any node finds a session it does not own.
func (r *router) pick(ctx context.Context, sid string) (int, error) {
	if sid != "" {
		r.mu.Lock()
		o, ok := r.owners[sid]
		r.mu.Unlock()
		if ok {
			return o.node, nil
		}
	}
	if len(r.nodes) == 1 {
		return 0, nil // its own attachment waits for it to come back
	}
	// Bounded: a few passes over the nodes while they re-attach.
	for attempt := 0; attempt < 50; attempt++ {
		start := int(r.next.Add(1))
		for k := range r.nodes {
			i := (start + k) % len(r.nodes)
			if r.nodes[i].Attached() {
				return i, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return 0, errNoNode
}

// remember records that node owns the session, and the JID ejabberd bound
// on it if this answer is the bind's.
func (r *router) remember(sid string, node int, answer []byte) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	o := r.owners[sid]
	o.node, o.lastSeen = node, now
	if o.jid == "" {
		o.jid = boundJID(answer)
	}
	r.owners[sid] = o
	// Sessions that end by inactivity never say so: sweep now and then.
	if r.sweeps++; r.sweeps >= 1024 {
		r.sweeps = 0
		for s, o := range r.owners {
			if now.Sub(o.lastSeen) > sessionTTL {
				delete(r.owners, s)
			}
		}
	}
}

func (r *router) forget(sid string) {
	if sid == "" {
		return
	}
	r.mu.Lock()
	// A session cut for its rate stays known as cut (until swept), so
	// that its client keeps getting policy-violation rather than
	// whatever ejabberd says of a session it has ended.
	if !r.owners[sid].rate.cut {
		delete(r.owners, sid)
	}
	r.mu.Unlock()
}

// jid returns the JID bound on a session, or "".
func (r *router) jid(sid string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.owners[sid].jid
}

// sessions returns how many sessions each node owns, by peer name.
func (r *router) sessions() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.nodes))
	for _, n := range r.nodes {
		out[n.Peer()] += 0
	}
	for _, o := range r.owners {
		out[r.nodes[o.node].Peer()]++
	}
	return out
}
