package sockets

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
)

// fakeSocket is one end of a pipe with a TCP-looking peer address, so the
// registry can take it as an accepted connection.
type fakeSocket struct {
	net.Conn
	peer *net.TCPAddr
}

func (f fakeSocket) RemoteAddr() net.Addr { return f.peer }

func admitFake(t testing.TB, r *Registry, ip string, port int, newStream bool) *Conn {
	t.Helper()
	ours, theirs := net.Pipe()
	t.Cleanup(func() { theirs.Close() })
	c, reason := r.admit(fakeSocket{Conn: ours, peer: &net.TCPAddr{IP: net.ParseIP(ip), Port: port}}, newStream)
	if c == nil {
		t.Fatalf("refused: %s", reason)
	}
	return c
}

// The operator's view: filters by transport, address and JID (a bare JID
// matches its resources), kick ends a stream its own way, draining refuses
// new streams but not HTTP connections, and the counts add up.
func TestRegistryListsKicksAndDrains(t *testing.T) {
	r := NewRegistry(Limits{})
	alice := admitFake(t, r, "192.0.2.1", 1000, true)
	alice.SetTransport("tls")
	alice.SetJID("alice@example.org/phone")
	bob := admitFake(t, r, "192.0.2.2", 1001, false)
	bob.SetTransport("bosh")
	bob.SetJID("bob@example.org/web")
	defer alice.Close()
	defer bob.Close()

	for _, tc := range []struct {
		f    ConnFilter
		want []uint64
	}{
		{ConnFilter{}, []uint64{alice.ID, bob.ID}},
		{ConnFilter{Transport: "tls"}, []uint64{alice.ID}},
		{ConnFilter{Peer: netip.MustParseAddr("192.0.2.2")}, []uint64{bob.ID}},
		{ConnFilter{JID: "ALICE@example.org"}, []uint64{alice.ID}},
		{ConnFilter{JID: "alice@example.org/laptop"}, nil},
		{ConnFilter{Limit: 1}, []uint64{alice.ID}},
	} {
		var got []uint64
		for _, i := range r.Connections(tc.f) {
			got = append(got, i.ID)
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%+v: got %v, want %v", tc.f, got, tc.want)
		}
	}

	var ended string
	alice.OnEnd(func(cond string) { ended = cond })
	if err := r.Kick(alice.ID); err != nil || ended != "policy-violation" {
		t.Errorf("kick: %v, stream ended with %q", err, ended)
	}
	if err := r.Kick(999); err != ErrNoConnection {
		t.Errorf("kick of an unknown id: %v", err)
	}

	r.SetDraining(true)
	if _, reason := r.admit(fakeSocket{Conn: nopConn{}, peer: &net.TCPAddr{IP: net.ParseIP("192.0.2.3")}}, true); reason != RefusedDraining {
		t.Errorf("a new stream while draining: %q", reason)
	}
	admitFake(t, r, "192.0.2.3", 1002, false).Close() // HTTP still comes in
	st := r.Stats()
	if st.Open != 2 || st.OpenByTransport["tls"] != 1 || st.OpenByTransport["bosh"] != 1 ||
		st.Refused[RefusedDraining] != 1 || st.Accepted != 3 || !st.Draining {
		t.Errorf("stats %+v", st)
	}
}

type nopConn struct{ net.Conn }

// What megaphone:connections/1 costs the sidecar with 100,000 connections
// open: the walk, the filter and the sort (BENCH.md has the figures).
func BenchmarkConnections100k(b *testing.B) {
	r := NewRegistry(Limits{})
	for i := 0; i < 100_000; i++ {
		c := admitFake(b, r, fmt.Sprintf("10.0.%d.%d", i/250, i%250+1), 1000+i%50000, true)
		c.SetTransport("tcp")
		c.SetJID(fmt.Sprintf("user%d@example.org/r", i))
	}
	b.Run("all", func(b *testing.B) {
		for b.Loop() {
			if n := len(r.Connections(ConnFilter{})); n != 100_000 {
				b.Fatal(n)
			}
		}
	})
	b.Run("one-jid", func(b *testing.B) {
		for b.Loop() {
			if n := len(r.Connections(ConnFilter{JID: "user77777@example.org"})); n != 1 {
				b.Fatal(n)
			}
		}
	})
	b.Run("stats", func(b *testing.B) {
		for b.Loop() {
			if r.Stats().Open != 100_000 {
				b.Fatal("open")
			}
		}
	})
}
