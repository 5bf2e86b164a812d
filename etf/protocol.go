package etf

import (
	"errors"
	"fmt"
	"net/netip"
)

// The bridge protocol between the sidecar and the shim. Every message is one
// Erlang term; docs/PROTOCOL.md is the reference and must match this file.
const (
	// ProtocolVersion is the newest protocol version this sidecar speaks.
	ProtocolVersion = 3
	// TokenVersion is the first version whose welcome carries a token that
	// the sidecar's messages to the session must carry (see FromSidecar).
	TokenVersion = 3
	// MinProtocolVersion is the oldest version this sidecar still speaks.
	MinProtocolVersion = 1
	// ListenerName is the name the shim registers on the ejabberd node; the
	// sidecar's hello goes there and nowhere else.
	ListenerName Atom = "megaphone_listener"
)

// Atoms of the protocol: constants only, never client data.
const (
	atomHello        Atom = "megaphone_hello"
	atomWelcome      Atom = "megaphone_welcome"
	atomRefused      Atom = "megaphone_refused"
	atomBOSHRequest  Atom = "bosh_request"
	atomBOSHCancel   Atom = "bosh_cancel"
	atomBOSHResponse Atom = "bosh_response"
)

// Hello opens a session: {megaphone_hello, SidecarPid, Version, Info}.
type Hello struct {
	Sidecar    Pid
	Version    int
	MinVersion int
	Name       string // the sidecar's node name, for the operator
	Build      string // the sidecar's build version
}

// Term returns the wire form of h.
func (h Hello) Term() Term {
	return Tuple{atomHello, h.Sidecar, h.Version, Map{
		{Atom("min_version"), h.MinVersion},
		{Atom("name"), h.Name},
		{Atom("build"), h.Build},
	}}
}

// Welcome accepts a hello: {megaphone_welcome, SessionPid, Version, Info}.
// Every later request of this sidecar goes to SessionPid.
type Welcome struct {
	Session  Pid
	Version  int
	Node     string
	OTP      string
	Ejabberd string
	// Token is the session's secret (version 3 on): every message to the
	// session goes wrapped with it (FromSidecar).
	Token []byte
}

// FromSidecar wraps a message to the shim's session for a protocol version:
// from version 3 on, {from_sidecar, Token, Msg}, so that the session can
// tell its sidecar's messages from anyone else's; before, msg itself.
func FromSidecar(version int, token []byte, msg Term) Term {
	if version < TokenVersion {
		return msg
	}
	return Tuple{Atom("from_sidecar"), token, msg}
}

// Refused rejects a hello: {megaphone_refused, Reason, SupportedVersions}.
type Refused struct {
	Reason    string
	Supported []int
}

// Header is one HTTP header of a BOSH response.
type Header struct {
	Name, Value string
}

// BOSHRequest carries one HTTP POST body:
// {bosh_request, ConnId, ReqId, {IP, Port}, Body}.
type BOSHRequest struct {
	ConnID uint64
	ReqID  uint64
	Peer   netip.AddrPort
	Body   []byte
}

// Term returns the wire form of r.
func (r BOSHRequest) Term() Term {
	return Tuple{atomBOSHRequest, r.ConnID, r.ReqID, PeerTerm(r.Peer), r.Body}
}

// BOSHCancel withdraws a request whose client went away:
// {bosh_cancel, ConnId, ReqId}.
type BOSHCancel struct {
	ConnID uint64
	ReqID  uint64
}

// Term returns the wire form of c.
func (c BOSHCancel) Term() Term {
	return Tuple{atomBOSHCancel, c.ConnID, c.ReqID}
}

// BOSHResponse answers a BOSHRequest:
// {bosh_response, ConnId, ReqId, Status, Reason, Headers, Body}.
type BOSHResponse struct {
	ConnID  uint64
	ReqID   uint64
	Status  int
	Reason  string
	Headers []Header
	Body    []byte
}

// C2SOpen asks the shim to start ejabberd_c2s for a client stream the
// sidecar has framed: {c2s_open, ConnId, TransportBin, Peer, Local}.
type C2SOpen struct {
	ConnID    uint64
	Transport string // "tcp", "tls" or "websocket"
	Peer      netip.AddrPort
	Local     netip.AddrPort
}

// Term returns the wire form of o.
func (o C2SOpen) Term() Term {
	return Tuple{Atom("c2s_open"), o.ConnID, o.Transport, PeerTerm(o.Peer), PeerTerm(o.Local)}
}

// C2SStarted says c2s runs: {c2s_started, ConnId, C2SPid, #{max_stanza_size => N | infinity}}.
// From then on the sidecar talks to C2SPid directly.
type C2SStarted struct {
	ConnID         uint64
	C2S            Pid
	MaxStanzaBytes int64 // 0: no limit
}

// C2SRefused says c2s could not start: {c2s_refused, ConnId, ReasonBin}.
type C2SRefused struct {
	ConnID uint64
	Reason string
}

// C2SOut is one stream event c2s writes: {c2s_out, ConnId, Event}.
type C2SOut struct {
	ConnID uint64
	Event  Term
}

// C2SClose says c2s closed the stream: {c2s_close, ConnId}.
type C2SClose struct{ ConnID uint64 }

// C2SShaper passes c2s's shaper on: {c2s_shaper, ConnId, BytesPerSecond | none}.
type C2SShaper struct {
	ConnID      uint64
	BytesPerSec int64 // 0: none
}

// C2SInput is what the sidecar sends straight to a c2s process: the
// message a socket owner sends in element mode, {tcp, megaphone, Events}.
func C2SInput(events []Term) Term {
	return Tuple{Atom("tcp"), Atom("megaphone"), List(events)}
}

// C2SClientClosed tells c2s the client went away: {tcp_closed, megaphone}.
func C2SClientClosed() Term { return Tuple{Atom("tcp_closed"), Atom("megaphone")} }

// PeerTerm renders an address as ejabberd expects it: {IPTuple, Port}.
func PeerTerm(ap netip.AddrPort) Term {
	addr := ap.Addr().Unmap()
	var ip Tuple
	if addr.Is4() {
		for _, b := range addr.As4() {
			ip = append(ip, int(b))
		}
	} else {
		a := addr.As16()
		for i := 0; i < 16; i += 2 {
			ip = append(ip, int(a[i])<<8|int(a[i+1]))
		}
	}
	return Tuple{ip, int(ap.Port())}
}

// Down is the 'DOWN' message of a monitor the sidecar set on a shim
// process: {'DOWN', Ref, process, Pid, Reason}.
type Down struct {
	Ref    Ref
	Pid    Pid
	Reason Term
}

// ErrNotProtocol reports a term that is no message of the bridge protocol.
var ErrNotProtocol = errors.New("etf: not a bridge protocol message")

// ParseShimMessage decodes a message the shim sends to the sidecar. It
// returns a Welcome, Refused or BOSHResponse, or an error for anything else;
// it never panics on hostile input.
func ParseShimMessage(t Term) (any, error) {
	tup, ok := t.(Tuple)
	if !ok || len(tup) == 0 {
		return nil, ErrNotProtocol
	}
	tag, _ := tup[0].(Atom)
	switch {
	case tag == "DOWN" && len(tup) == 5:
		ref, ok1 := tup[1].(Ref)
		pid, ok2 := tup[3].(Pid)
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("%w: malformed DOWN", ErrNotProtocol)
		}
		return Down{Ref: ref, Pid: pid, Reason: tup[4]}, nil
	case tag == atomControl && len(tup) == 4:
		return parseControl(tup)
	case tag == atomBOSHResponse && len(tup) == 7:
		return parseBOSHResponse(tup)
	case tag == "c2s_out" && len(tup) == 3:
		id, ok := Uint64(tup[1])
		if !ok {
			return nil, fmt.Errorf("%w: malformed c2s_out", ErrNotProtocol)
		}
		return C2SOut{ConnID: id, Event: tup[2]}, nil
	case tag == "c2s_close" && len(tup) == 2:
		id, ok := Uint64(tup[1])
		if !ok {
			return nil, fmt.Errorf("%w: malformed c2s_close", ErrNotProtocol)
		}
		return C2SClose{ConnID: id}, nil
	case tag == "c2s_shaper" && len(tup) == 3:
		id, ok := Uint64(tup[1])
		if !ok {
			return nil, fmt.Errorf("%w: malformed c2s_shaper", ErrNotProtocol)
		}
		rate, _ := Int64(tup[2])
		return C2SShaper{ConnID: id, BytesPerSec: max(rate, 0)}, nil // none, or nonsense: no limit
	case tag == "c2s_started" && len(tup) == 4:
		id, ok1 := Uint64(tup[1])
		pid, ok2 := tup[2].(Pid)
		info, ok3 := tup[3].(Map)
		if !ok1 || !ok2 || !ok3 {
			return nil, fmt.Errorf("%w: malformed c2s_started", ErrNotProtocol)
		}
		started := C2SStarted{ConnID: id, C2S: pid}
		if v, ok := info.Get("max_stanza_size"); ok {
			n, _ := Int64(v) // infinity: no limit
			started.MaxStanzaBytes = max(n, 0)
		}
		return started, nil
	case tag == "c2s_refused" && len(tup) == 3:
		id, ok := Uint64(tup[1])
		reason, _ := tup[2].([]byte)
		if !ok {
			return nil, fmt.Errorf("%w: malformed c2s_refused", ErrNotProtocol)
		}
		return C2SRefused{ConnID: id, Reason: string(reason)}, nil
	case tag == atomWelcome && len(tup) == 4:
		pid, ok1 := tup[1].(Pid)
		ver, ok2 := Int64(tup[2])
		info, ok3 := tup[3].(Map)
		if !ok1 || !ok2 || !ok3 {
			return nil, fmt.Errorf("%w: malformed welcome", ErrNotProtocol)
		}
		w := Welcome{
			Session:  pid,
			Version:  int(ver),
			Node:     textOf(info, "node"),
			OTP:      textOf(info, "otp_release"),
			Ejabberd: textOf(info, "ejabberd"),
		}
		if tok, ok := info.Get("token"); ok {
			w.Token, _ = tok.([]byte)
		}
		if w.Version >= TokenVersion && len(w.Token) == 0 {
			return nil, fmt.Errorf("%w: welcome to version %d without its token", ErrNotProtocol, w.Version)
		}
		return w, nil
	case tag == atomRefused && len(tup) == 3:
		reason, _ := tup[1].([]byte)
		var supported []int
		if l, ok := tup[2].(List); ok {
			for _, v := range l {
				if n, ok := Int64(v); ok {
					supported = append(supported, int(n))
				}
			}
		}
		return Refused{Reason: string(reason), Supported: supported}, nil
	}
	return nil, ErrNotProtocol
}

func parseBOSHResponse(tup Tuple) (BOSHResponse, error) {
	var r BOSHResponse
	var ok bool
	bad := func(what string) (BOSHResponse, error) {
		return BOSHResponse{}, fmt.Errorf("%w: bosh_response with bad %s", ErrNotProtocol, what)
	}
	if r.ConnID, ok = Uint64(tup[1]); !ok {
		return bad("connection id")
	}
	if r.ReqID, ok = Uint64(tup[2]); !ok {
		return bad("request id")
	}
	status, ok := Int64(tup[3])
	if !ok || status < 100 || status > 999 {
		return bad("status")
	}
	r.Status = int(status)
	reason, ok := tup[4].([]byte)
	if !ok {
		return bad("reason")
	}
	r.Reason = string(reason)
	headers, ok := tup[5].(List)
	if !ok {
		return bad("headers")
	}
	for _, h := range headers {
		pair, ok := h.(Tuple)
		if !ok || len(pair) != 2 {
			return bad("header")
		}
		name, ok1 := pair[0].([]byte)
		value, ok2 := pair[1].([]byte)
		if !ok1 || !ok2 {
			return bad("header")
		}
		r.Headers = append(r.Headers, Header{Name: string(name), Value: string(value)})
	}
	if r.Body, ok = tup[6].([]byte); !ok {
		return bad("body")
	}
	return r, nil
}

func textOf(m Map, key Atom) string {
	v, _ := m.Get(key)
	switch s := v.(type) {
	case []byte:
		return string(s)
	case Atom:
		return string(s)
	}
	return ""
}
