package node

import (
	"io"
	"net"
	"testing"

	"github.com/megaphone-im/megaphone/etf"
)

// FuzzLinkDispatch feeds the link any frame a compromised or broken node
// could send after the handshake: control messages of every kind with any
// payload. A frame must be handled or refused with an error (the link is
// then dropped); it must never panic the sidecar.
func FuzzLinkDispatch(f *testing.F) {
	n, err := New(Config{Name: "fuzz@localhost", Cookie: "cookie"})
	if err != nil {
		f.Fatal(err)
	}
	peer := etf.Pid{Node: "ejabberd@localhost", ID: 80, Creation: 3}
	ref := etf.Ref{Node: "ejabberd@localhost", Creation: 3, IDs: []uint32{1, 2, 3}}
	for _, seed := range []struct{ ctl, payload etf.Term }{
		{etf.Tuple{opSend, etf.Atom(""), n.self}, etf.Tuple{etf.Atom("c2s_close"), 1}},
		{etf.Tuple{opSendSender, peer, n.self}, etf.Tuple{etf.Atom("c2s_out"), 1, etf.Tuple{etf.Atom("xmlstreamend"), "stream:stream"}}},
		{etf.Tuple{opRegSend, peer, etf.Atom(""), etf.Atom("net_kernel")},
			etf.Tuple{etf.Atom("$gen_call"), etf.Tuple{peer, ref}, etf.Tuple{etf.Atom("is_auth"), etf.Atom("ejabberd@localhost")}}},
		{etf.Tuple{opLink, peer, n.self}, nil},
		{etf.Tuple{opUnlink, peer, n.self}, nil},
		{etf.Tuple{opUnlinkID, 7, peer, n.self}, nil},
		{etf.Tuple{opMonitorP, peer, n.self, ref}, nil},
		{etf.Tuple{opDemonitorP, peer, n.self, ref}, nil},
		{etf.Tuple{opExit, peer, n.self, etf.Atom("normal")}, nil},
		{etf.Tuple{opExit, peer, n.self}, nil}, // no reason: malformed
		{etf.Tuple{opExitTT, peer, n.self, etf.Atom("token"), etf.Atom("normal")}, nil},
		{etf.Tuple{opPayloadExit, peer, n.self}, etf.Atom("killed")},
		{etf.Tuple{opExit2, peer, n.self, etf.Atom("kill")}, nil},
		{etf.Tuple{opExit2}, nil}, // malformed
		{etf.Tuple{opGroupLeader, peer, n.self}, nil},
	} {
		frame := []byte{passThrough}
		if frame, err = etf.AppendEncode(frame, seed.ctl); err != nil {
			f.Fatal(err)
		}
		if seed.payload != nil {
			if frame, err = etf.AppendEncode(frame, seed.payload); err != nil {
				f.Fatal(err)
			}
		}
		f.Add(frame)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) == 0 {
			return // the reader takes an empty frame for a tick
		}
		ours, theirs := net.Pipe()
		drained := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, theirs); close(drained) }() // our answers (acks, noproc)
		l := n.newLink(ours, nil, peerInfo{name: "ejabberd@localhost"}, func(*Link, Delivery) {})
		_ = l.dispatch(frame)
		l.Close()
		<-drained
	})
}
