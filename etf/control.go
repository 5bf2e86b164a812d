package etf

import (
	"fmt"
	"net/netip"
)

// The operator's commands: megaphone:status(), connections(), info(),
// kick(), drain() and limits() in ejabberd's shell reach each sidecar as
//
//	{megaphone_control, ReplyTo, Ref, Command}
//
// and the sidecar answers ReplyTo with {megaphone_reply, Ref, Result}.
// docs/PROTOCOL.md lists the commands and their results.

const (
	atomControl Atom = "megaphone_control"
	atomReply   Atom = "megaphone_reply"
)

// ControlRequest is one operator command for this sidecar.
type ControlRequest struct {
	ReplyTo Pid
	Ref     Ref
	Command ControlCommand
}

// ControlCommand is one of the command types below.
type ControlCommand interface{ controlCommand() }

// StatusQuery asks for the sidecar's status: `status`.
type StatusQuery struct{}

// ConnectionsQuery lists connections: {connections, #{transport => Bin,
// peer => IPBin, jid => Bin, limit => N}}, every key optional.
type ConnectionsQuery struct {
	Transport string
	Peer      netip.Addr
	JID       string
	Limit     int
}

// InfoQuery asks about one connection: {info, ConnId}.
type InfoQuery struct{ ConnID uint64 }

// KickCommand ends one connection: {kick, ConnId}.
type KickCommand struct{ ConnID uint64 }

// DrainCommand stops (true) or resumes (false) taking new connections:
// {drain, Bool}.
type DrainCommand struct{ On bool }

// LimitsCommand reads the limits (`limits`, Set nil) or changes some of
// them ({limits, #{max_conns => N, ...}}).
type LimitsCommand struct{ Set map[string]int64 }

func (StatusQuery) controlCommand()      {}
func (ConnectionsQuery) controlCommand() {}
func (InfoQuery) controlCommand()        {}
func (KickCommand) controlCommand()      {}
func (DrainCommand) controlCommand()     {}
func (LimitsCommand) controlCommand()    {}

// LimitNames are the limits an operator may set, as the shim names them.
var LimitNames = []string{"max_conns", "max_conns_per_ip", "max_body_bytes", "max_stanza_bytes", "max_bosh_requests_per_sec"}

// ControlReply is the answer to a ControlRequest.
func ControlReply(ref Ref, result Term) Term { return Tuple{atomReply, ref, result} }

// ControlError is the result {error, Reason} with Reason an atom from the
// sidecar's own fixed set (never client data).
func ControlError(reason Atom) Term { return Tuple{Atom("error"), reason} }

func parseControl(tup Tuple) (ControlRequest, error) {
	from, ok1 := tup[1].(Pid)
	ref, ok2 := tup[2].(Ref)
	if !ok1 || !ok2 {
		return ControlRequest{}, fmt.Errorf("%w: malformed megaphone_control", ErrNotProtocol)
	}
	cmd, err := parseCommand(tup[3])
	if err != nil {
		return ControlRequest{}, err
	}
	return ControlRequest{ReplyTo: from, Ref: ref, Command: cmd}, nil
}

func parseCommand(t Term) (ControlCommand, error) {
	bad := fmt.Errorf("%w: unknown control command", ErrNotProtocol)
	switch c := t.(type) {
	case Atom:
		switch c {
		case "status":
			return StatusQuery{}, nil
		case "limits":
			return LimitsCommand{}, nil
		}
	case Tuple:
		if len(c) != 2 {
			return nil, bad
		}
		tag, _ := c[0].(Atom)
		switch tag {
		case "connections":
			return parseConnectionsQuery(c[1])
		case "info", "kick":
			id, ok := Uint64(c[1])
			if !ok {
				return nil, bad
			}
			if tag == "info" {
				return InfoQuery{ConnID: id}, nil
			}
			return KickCommand{ConnID: id}, nil
		case "drain":
			on, ok := c[1].(bool)
			if !ok {
				return nil, bad
			}
			return DrainCommand{On: on}, nil
		case "limits":
			return parseLimits(c[1])
		}
	}
	return nil, bad
}

func parseConnectionsQuery(t Term) (ControlCommand, error) {
	m, ok := t.(Map)
	if !ok {
		return nil, fmt.Errorf("%w: connections filter is not a map", ErrNotProtocol)
	}
	q := ConnectionsQuery{Transport: textOf(m, "transport"), JID: textOf(m, "jid")}
	if p := textOf(m, "peer"); p != "" {
		addr, err := netip.ParseAddr(p)
		if err != nil {
			return nil, fmt.Errorf("%w: peer %q is no IP address", ErrNotProtocol, p)
		}
		q.Peer = addr
	}
	if v, ok := m.Get("limit"); ok {
		n, ok := Int64(v)
		if !ok || n < 0 {
			return nil, fmt.Errorf("%w: bad limit", ErrNotProtocol)
		}
		q.Limit = int(n)
	}
	return q, nil
}

func parseLimits(t Term) (ControlCommand, error) {
	m, ok := t.(Map)
	if !ok {
		return nil, fmt.Errorf("%w: limits is not a map", ErrNotProtocol)
	}
	set := make(map[string]int64, len(m))
	for _, e := range m {
		key, _ := e.Key.(Atom)
		n, ok := Int64(e.Value)
		if !ok || n < 0 || !knownLimit(string(key)) {
			return nil, fmt.Errorf("%w: bad limit %v", ErrNotProtocol, e.Key)
		}
		set[string(key)] = n
	}
	return LimitsCommand{Set: set}, nil
}

func knownLimit(name string) bool {
	for _, n := range LimitNames {
		if n == name {
			return true
		}
	}
	return false
}

// SidecarDraining tells the shim session the sidecar stopped (true) or
// resumed (false) taking new connections: {sidecar_draining, Bool}.
func SidecarDraining(on bool) Term {
	return Tuple{Atom("sidecar_draining"), on}
}
