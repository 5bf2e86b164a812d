package sockets

import (
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// Two listeners with ReusePort share one address and the kernel spreads
// connections over both; a listener without it is refused the address;
// once one closes, every new connection goes to the other.
func TestListenReusePortSharesTheAddress(t *testing.T) {
	lc := ListenConfig{ReusePort: true}
	a, err := lc.ListenStreams("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	addr := a.Addr().String()
	b, err := lc.ListenStreams(addr, NewRegistry(Limits{}), zap.NewNop())
	if err != nil {
		t.Fatalf("second listener with SO_REUSEPORT on %s: %v", addr, err)
	}
	defer b.Close()
	if l, err := Listen(addr, NewRegistry(Limits{}), zap.NewNop()); !errors.Is(err, syscall.EADDRINUSE) {
		if l != nil {
			l.Close()
		}
		t.Fatalf("a listener without SO_REUSEPORT on a shared address: %v, want EADDRINUSE", err)
	}

	count := func(l *Listener) chan int {
		n := make(chan int, 1)
		go func() {
			seen := 0
			for {
				c, err := l.Accept()
				if err != nil {
					n <- seen
					return
				}
				seen++
				c.Close()
			}
		}()
		return n
	}
	dialAll := func(k int) {
		for i := 0; i < k; i++ {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.Read(make([]byte, 1)) // until the listener has taken and closed it
			c.Close()
		}
	}
	na, nb := count(a), count(b)
	dialAll(64) // each from a new source port: the hash sends both ways
	a.Close()
	fromA := <-na
	dialAll(16)
	b.Close()
	fromB := <-nb
	if fromA == 0 || fromB <= 16 || fromA+fromB != 80 {
		t.Errorf("accepted %d on the first and %d on the second listener; want both some of the first 64, and all 16 later ones on the second", fromA, fromB)
	}
}

// flakyListener fails its first accepts as a process out of descriptors
// does.
type flakyListener struct {
	net.Listener
	failures int
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if f.failures > 0 {
		f.failures--
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return f.Listener.Accept()
}

// Out of descriptors for a moment, the listener waits and goes on
// accepting, rather than returning the error (which would stop serving).
func TestListenerRetriesAcceptWhenOutOfDescriptors(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := &Listener{Listener: &flakyListener{Listener: inner, failures: 3}, registry: NewRegistry(Limits{}), log: zap.NewNop()}
	defer lis.Close()
	c, err := net.DialTimeout("tcp", inner.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := lis.Accept()
	if err != nil {
		t.Fatalf("accept after EMFILE: %v", err)
	}
	got.Close()
	lis.Close()
	if _, err := lis.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("accept on a closed listener: %v, want net.ErrClosed", err)
	}
}

// KeepAlive sets the accepted connections' TCP keep-alive: on by default,
// off when negative.
func TestListenKeepAlive(t *testing.T) {
	for _, tc := range []struct {
		keepAlive time.Duration
		want      int
	}{{0, 1}, {-1, 0}, {time.Minute, 1}} {
		lis, err := ListenConfig{KeepAlive: tc.keepAlive}.ListenStreams("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.DialTimeout("tcp", lis.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		got, err := lis.Accept()
		if err != nil {
			t.Fatal(err)
		}
		raw, err := got.(*Conn).Conn.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		on := -1
		_ = raw.Control(func(fd uintptr) { on, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE) })
		if on != tc.want {
			t.Errorf("KeepAlive %v: SO_KEEPALIVE %d, want %d", tc.keepAlive, on, tc.want)
		}
		got.Close()
		c.Close()
		lis.Close()
	}
}
