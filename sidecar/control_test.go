package sidecar

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
)

// What the answer to megaphone:connections() costs to build and encode
// with 100,000 connections (sockets.BenchmarkConnections100k is the walk
// before it; BENCH.md has both).
func BenchmarkConnectionsAnswer100k(b *testing.B) {
	s := &Sidecar{cfg: Config{Name: "megaphone@localhost"}}
	infos := make([]sockets.ConnInfo, 100_000)
	for i := range infos {
		infos[i] = sockets.ConnInfo{ID: uint64(i + 1), Transport: "tcp",
			Peer:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), uint16(i)),
			Opened: time.Now(), BytesIn: 4096, BytesOut: 8192,
			JID: fmt.Sprintf("user%d@example.org/r", i), Session: "<ejabberd@localhost.1234.0>"}
	}
	for b.Loop() {
		rows := make(etf.List, 0, len(infos))
		for _, i := range infos {
			rows = append(rows, s.connTerm(i))
		}
		if _, err := etf.Encode(etf.ControlReply(etf.Ref{Node: "ejabberd@localhost", IDs: []uint32{1, 2, 3}}, rows)); err != nil {
			b.Fatal(err)
		}
	}
}
