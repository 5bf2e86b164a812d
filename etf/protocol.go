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
	ProtocolVersion = 1
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
	case tag == atomBOSHResponse && len(tup) == 7:
		return parseBOSHResponse(tup)
	case tag == atomWelcome && len(tup) == 4:
		pid, ok1 := tup[1].(Pid)
		ver, ok2 := Int64(tup[2])
		info, ok3 := tup[3].(Map)
		if !ok1 || !ok2 || !ok3 {
			return nil, fmt.Errorf("%w: malformed welcome", ErrNotProtocol)
		}
		return Welcome{
			Session:  pid,
			Version:  int(ver),
			Node:     textOf(info, "node"),
			OTP:      textOf(info, "otp_release"),
			Ejabberd: textOf(info, "ejabberd"),
		}, nil
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
