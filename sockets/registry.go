package sockets

import (
	"errors"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Limits bound what the sidecar accepts. Zero means no limit. They can be
// changed while the sidecar runs (megaphone:limits/1 in ejabberd's shell,
// SIGHUP); each applies from the next connection, request or stream on.
type Limits struct {
	MaxConns       int   // open client connections in all, over every listener
	MaxConnsPerIP  int   // open client connections from one source address
	MaxBodyBytes   int64 // largest BOSH request body
	MaxStanzaBytes int64 // largest stanza on a stream until ejabberd says its own
	// MaxBOSHRequestsPerSec is one BOSH session's request rate (bursts of
	// as many); a session over it is ended with a policy-violation
	// terminate (XEP-0124's answer to overactivity). 0: no limit.
	MaxBOSHRequestsPerSec int
}

// Refusal reasons, as counted in RegistryStats.Refused.
const (
	RefusedMaxConns      = "max_conns"
	RefusedMaxConnsPerIP = "max_conns_per_ip"
	RefusedDraining      = "draining"
)

// Registry is the sidecar's table of open client connections, shared by
// every listener: it hands out connection IDs (64-bit, unique for one run;
// with the sidecar's pid, fresh each run, unique for ejabberd too),
// enforces the connection limits across all listeners together, and
// answers the operator's questions (list, info, kick).
type Registry struct {
	lastID   atomic.Uint64
	limits   atomic.Pointer[Limits]
	draining atomic.Bool

	mu       sync.Mutex
	conns    map[uint64]*Conn
	perIP    map[netip.Addr]int
	accepted uint64
	refused  map[string]uint64
	// bytes of connections already closed, so totals survive them
	closedIn, closedOut uint64
	// stream errors sent to clients by condition, failed TLS handshakes by
	// kind ("tls" direct, "starttls"): for metrics
	streamErrors, handshakeFailures map[string]uint64
}

// NewRegistry returns an empty registry with the given limits.
func NewRegistry(limits Limits) *Registry {
	r := &Registry{conns: make(map[uint64]*Conn), perIP: make(map[netip.Addr]int), refused: make(map[string]uint64),
		streamErrors: make(map[string]uint64), handshakeFailures: make(map[string]uint64)}
	r.SetLimits(limits)
	return r
}

// Limits returns the limits in force.
func (r *Registry) Limits() Limits { return *r.limits.Load() }

// SetLimits replaces the limits; connections already open stay.
func (r *Registry) SetLimits(l Limits) { r.limits.Store(&l) }

// SetDraining makes the stream listeners refuse (true) or take again
// (false) new connections, and the WebSocket handler new streams; open
// ones are not touched. HTTP connections are still taken: a BOSH client
// may open a fresh one for any request of its session, so for BOSH
// draining means no new sessions, which the BOSH front refuses itself.
func (r *Registry) SetDraining(on bool) { r.draining.Store(on) }

// Draining reports whether new connections are refused.
func (r *Registry) Draining() bool { return r.draining.Load() }

// admit registers a freshly accepted socket, or says why it may not stay.
// A connection for a new stream (not HTTP) is refused while draining.
func (r *Registry) admit(raw net.Conn, newStream bool) (*Conn, string) {
	peer := addrPort(raw.RemoteAddr())
	ip := peer.Addr()
	lim := r.Limits()
	r.mu.Lock()
	defer r.mu.Unlock()
	reason := ""
	switch {
	case newStream && r.draining.Load():
		reason = RefusedDraining
	case lim.MaxConns > 0 && len(r.conns) >= lim.MaxConns:
		reason = RefusedMaxConns
	case lim.MaxConnsPerIP > 0 && r.perIP[ip] >= lim.MaxConnsPerIP:
		reason = RefusedMaxConnsPerIP
	}
	if reason != "" {
		r.refused[reason]++
		return nil, reason
	}
	c := &Conn{Conn: raw, ID: r.lastID.Add(1), Peer: peer, Opened: time.Now(), registry: r}
	r.conns[c.ID] = c
	r.perIP[ip]++
	r.accepted++
	return c, ""
}

func (r *Registry) release(c *Conn) {
	ip := c.Peer.Addr()
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c.ID)
	if r.perIP[ip]--; r.perIP[ip] <= 0 {
		delete(r.perIP, ip)
	}
	r.closedIn += c.bytesIn.Load()
	r.closedOut += c.bytesOut.Load()
}

// RegistryStats counts the registry's connections.
type RegistryStats struct {
	Open              int
	OpenByTransport   map[string]int
	Accepted          uint64
	Refused           map[string]uint64 // by reason
	BytesIn, BytesOut uint64            // over the whole run
	Draining          bool
	StreamErrors      map[string]uint64 // stream errors sent to clients, by condition
	HandshakeFailures map[string]uint64 // failed TLS handshakes: "tls" (direct), "starttls"
}

func (r *Registry) countStreamError(cond string) {
	r.mu.Lock()
	r.streamErrors[cond]++
	r.mu.Unlock()
}

func (r *Registry) countHandshakeFailure(kind string) {
	r.mu.Lock()
	r.handshakeFailures[kind]++
	r.mu.Unlock()
}

func copyCounts(m map[string]uint64) map[string]uint64 {
	out := make(map[string]uint64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Stats returns the registry's counts. It walks the open connections, so
// it costs a few milliseconds at 100,000 of them.
func (r *Registry) Stats() RegistryStats {
	live := r.snapshot()
	r.mu.Lock()
	s := RegistryStats{Open: len(live), OpenByTransport: make(map[string]int), Accepted: r.accepted,
		Refused: copyCounts(r.refused), BytesIn: r.closedIn, BytesOut: r.closedOut,
		Draining: r.draining.Load(), StreamErrors: copyCounts(r.streamErrors),
		HandshakeFailures: copyCounts(r.handshakeFailures)}
	r.mu.Unlock()
	for _, c := range live {
		c.mu.Lock()
		s.OpenByTransport[c.transport]++
		c.mu.Unlock()
		s.BytesIn += c.bytesIn.Load()
		s.BytesOut += c.bytesOut.Load()
	}
	return s
}

func (r *Registry) snapshot() []*Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Conn, 0, len(r.conns))
	for _, c := range r.conns {
		out = append(out, c)
	}
	return out
}

// ConnFilter selects connections; zero fields match everything.
type ConnFilter struct {
	Transport string
	// Peer matches the client's address (without the port).
	Peer netip.Addr
	// JID matches the bound JID: a bare JID matches all its resources.
	JID string
	// Limit caps how many are returned (0: all), oldest first.
	Limit int
}

func (f ConnFilter) match(i ConnInfo) bool {
	if f.Transport != "" && f.Transport != i.Transport {
		return false
	}
	if f.Peer.IsValid() && f.Peer.Unmap() != i.Peer.Addr().Unmap() {
		return false
	}
	if f.JID != "" {
		if strings.Contains(f.JID, "/") {
			return strings.EqualFold(f.JID, i.JID)
		}
		bare, _, _ := strings.Cut(i.JID, "/")
		return strings.EqualFold(f.JID, bare)
	}
	return true
}

// Connections lists the open connections that match f, oldest first.
func (r *Registry) Connections(f ConnFilter) []ConnInfo {
	var out []ConnInfo
	for _, c := range r.snapshot() {
		if i := c.Info(); f.match(i) {
			out = append(out, i)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
	}
	return out
}

// Lookup returns one open connection.
func (r *Registry) Lookup(id uint64) (*Conn, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.conns[id]
	return c, ok
}

// ErrNoConnection means no open connection has the ID.
var ErrNoConnection = errors.New("no such connection")

// Kick ends one connection as an operator's kick: XMPP streams get a
// policy-violation stream error, other connections are closed.
func (r *Registry) Kick(id uint64) error {
	c, ok := r.Lookup(id)
	if !ok {
		return ErrNoConnection
	}
	c.End("policy-violation")
	return nil
}

// EndAll ends every open connection with the stream error condition (the
// end of a drain: system-shutdown).
func (r *Registry) EndAll(cond string) {
	for _, c := range r.snapshot() {
		c.End(cond)
	}
}
