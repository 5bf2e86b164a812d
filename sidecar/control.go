package sidecar

import (
	"context"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
)

// Control answers the operator's commands from ejabberd's shell
// (node.Controller). Every atom in a result comes from the fixed set
// below; client data (JIDs, addresses) travels as binaries, so nothing a
// client sends becomes an atom on the ejabberd node.
func (s *Sidecar) Control(_ context.Context, peer string, cmd etf.ControlCommand) etf.Term {
	switch c := cmd.(type) {
	case etf.StatusQuery:
		return s.statusTerm(peer)
	case etf.ConnectionsQuery:
		f := sockets.ConnFilter{Transport: c.Transport, Peer: c.Peer, JID: c.JID, Limit: c.Limit}
		rows := etf.List{}
		for _, info := range s.registry.Connections(f) {
			rows = append(rows, s.connTerm(info))
		}
		return rows
	case etf.InfoQuery:
		conn, ok := s.registry.Lookup(c.ConnID)
		if !ok {
			return etf.ControlError("not_found")
		}
		return etf.Tuple{etf.Atom("ok"), s.connTerm(conn.Info())}
	case etf.KickCommand:
		if err := s.registry.Kick(c.ConnID); err != nil {
			return etf.ControlError("not_found")
		}
		return etf.Atom("ok")
	case etf.DrainCommand:
		s.SetDraining(c.On)
		return etf.Atom("ok")
	case etf.LimitsCommand:
		if c.Set != nil {
			s.SetLimits(applyLimits(s.Limits(), c.Set))
		}
		return limitsTerm(s.Limits())
	}
	return etf.ControlError("unknown_command")
}

// transportAtoms is the fixed set of transport names sent as atoms.
var transportAtoms = map[string]etf.Atom{"tcp": "tcp", "tls": "tls", "websocket": "websocket", "bosh": "bosh"}

// transportAtom names a connection's transport; a connection that has not
// said yet (an HTTP connection before its first request, a stream still
// negotiating TLS) is "opening".
func transportAtom(t string) etf.Atom {
	if a, ok := transportAtoms[t]; ok {
		return a
	}
	return "opening"
}

func (s *Sidecar) statusTerm(peer string) etf.Term {
	st := s.registry.Stats()
	byTransport := etf.Map{}
	for t, n := range st.OpenByTransport {
		byTransport = append(byTransport, etf.MapEntry{Key: transportAtom(t), Value: n})
	}
	refused := etf.Map{}
	for reason, n := range st.Refused {
		refused = append(refused, etf.MapEntry{Key: etf.Atom(reason), Value: n}) // sockets.Refused* constants
	}
	nodes := etf.List{}
	for _, a := range s.attached {
		state := a.State()
		nodes = append(nodes, etf.Map{
			{Key: etf.Atom("node"), Value: []byte(state.Peer)},
			{Key: etf.Atom("attached"), Value: state.Attached},
			{Key: etf.Atom("streams"), Value: a.Streams()},
		})
	}
	// Relayed sessions are routed to one node each; sessions at the edge
	// (--bosh-mode edge) are this process's own, each a stream of a node.
	boshSessions, boshEdgeSessions := 0, 0
	if s.front != nil {
		boshSessions = s.front.Sessions()[peer]
		boshEdgeSessions = s.front.Stats().EdgeOpen
	}
	return etf.Map{
		{Key: etf.Atom("name"), Value: []byte(s.cfg.Name)},
		{Key: etf.Atom("build"), Value: []byte(s.cfg.Version)},
		{Key: etf.Atom("uptime_s"), Value: int64(time.Since(s.started).Seconds())},
		{Key: etf.Atom("draining"), Value: st.Draining},
		{Key: etf.Atom("open"), Value: st.Open},
		{Key: etf.Atom("connections"), Value: byTransport},
		{Key: etf.Atom("bosh_sessions"), Value: boshSessions},
		{Key: etf.Atom("bosh_edge_sessions"), Value: boshEdgeSessions},
		{Key: etf.Atom("accepted"), Value: st.Accepted},
		{Key: etf.Atom("refused"), Value: refused},
		{Key: etf.Atom("bytes_in"), Value: st.BytesIn},
		{Key: etf.Atom("bytes_out"), Value: st.BytesOut},
		{Key: etf.Atom("limits"), Value: limitsTerm(s.Limits())},
		{Key: etf.Atom("ejabberd_nodes"), Value: nodes},
	}
}

func (s *Sidecar) connTerm(i sockets.ConnInfo) etf.Term {
	var jid etf.Term = etf.Atom("undefined")
	if i.JID != "" {
		jid = []byte(i.JID)
	}
	return etf.Map{
		{Key: etf.Atom("id"), Value: i.ID},
		{Key: etf.Atom("transport"), Value: transportAtom(i.Transport)},
		{Key: etf.Atom("peer"), Value: etf.PeerTerm(i.Peer)},
		{Key: etf.Atom("jid"), Value: jid},
		{Key: etf.Atom("session"), Value: []byte(i.Session)},
		{Key: etf.Atom("age_s"), Value: int64(time.Since(i.Opened).Seconds())},
		{Key: etf.Atom("bytes_in"), Value: i.BytesIn},
		{Key: etf.Atom("bytes_out"), Value: i.BytesOut},
		{Key: etf.Atom("sidecar"), Value: []byte(s.cfg.Name)},
	}
}

func limitsTerm(l sockets.Limits) etf.Term {
	return etf.Map{
		{Key: etf.Atom("max_conns"), Value: l.MaxConns},
		{Key: etf.Atom("max_conns_per_ip"), Value: l.MaxConnsPerIP},
		{Key: etf.Atom("max_body_bytes"), Value: l.MaxBodyBytes},
		{Key: etf.Atom("max_stanza_bytes"), Value: l.MaxStanzaBytes},
		{Key: etf.Atom("max_bosh_requests_per_sec"), Value: l.MaxBOSHRequestsPerSec},
	}
}

// applyLimits changes the named limits (etf.LimitNames) of l.
func applyLimits(l sockets.Limits, set map[string]int64) sockets.Limits {
	for name, v := range set {
		switch name {
		case "max_conns":
			l.MaxConns = int(v)
		case "max_conns_per_ip":
			l.MaxConnsPerIP = int(v)
		case "max_body_bytes":
			l.MaxBodyBytes = v
		case "max_stanza_bytes":
			l.MaxStanzaBytes = v
		case "max_bosh_requests_per_sec":
			l.MaxBOSHRequestsPerSec = int(v)
		}
	}
	return l
}
