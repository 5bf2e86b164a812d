package sockets

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// An idle stream should cost almost nothing, so its reader must not wait
// in a Read: a blocked Read holds the buffer it reads into for as long as
// the client is quiet. Instead the reader takes a pooled buffer only once
// the socket is readable, reads what is there without blocking
// (pollingConn), frames it, and gives the buffer back. Once an open
// stream's socket is drained between two units, its reader ends and the
// socket waits in the process's poller (poller.go) with no goroutine at
// all; before that (the stream header, a unit half read) the reader waits
// in waitReadable, holding no buffer. A reader that runs is still what
// stops a stream for the shaper and for a busy link: it is not parked
// until Send has returned and the shaper's pause is over.

// pollingConn is a client socket whose reads, once polling is on, never
// wait: with nothing to read they fail with errWouldBlock. crypto/tls
// treats a temporary net.Error from its socket as "try again later" (it
// keeps the partial record and does not make the error sticky), so a TLS
// stream reads through it too, after its handshake, which needs blocking
// reads.
type pollingConn struct {
	*Conn
	raw     syscall.RawConn
	polling atomic.Bool

	// Parking in the poller (poller.go).
	mu    sync.Mutex
	state uint8        // readerRunning, readerParked or readerClosed
	token uint64       // the socket's token in the poller; 0: not registered
	owner parkedReader // what a wake-up runs; nil: never parked
}

// clientSocket returns the socket a stream reads and writes: a
// pollingConn, or c itself when it has no descriptor to poll (it is then
// read the blocking way).
func clientSocket(c *Conn) net.Conn {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return c
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	p := &pollingConn{Conn: c, raw: raw}
	c.poll.Store(p) // Close takes the socket out of the poller first
	return p
}

// pollingSocket finds the pollingConn under conn, if there is one, and
// whether conn reads it directly (no TLS buffering in between).
func pollingSocket(conn net.Conn) (p *pollingConn, direct bool) {
	switch c := conn.(type) {
	case *pollingConn:
		return c, true
	case *tls.Conn:
		p, _ := c.NetConn().(*pollingConn)
		return p, false
	}
	return nil, false
}

// errWouldBlock is a read that found nothing to read.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "nothing to read yet" }
func (wouldBlock) Timeout() bool   { return false }
func (wouldBlock) Temporary() bool { return true } // crypto/tls: not for good

// Read reads what the socket holds, without waiting once polling is on.
// Read deadlines apply (a takeover stops the reader with one).
func (p *pollingConn) Read(b []byte) (int, error) {
	if !p.polling.Load() {
		return p.Conn.Read(b)
	}
	var n int
	var rerr error
	err := p.raw.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), b)
		return true // never wait here: waitReadable does
	})
	switch {
	case err != nil:
		return 0, err // a deadline, or the socket closed
	case errors.Is(rerr, syscall.EAGAIN):
		return 0, errWouldBlock
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	p.bytesIn.Add(uint64(n))
	return n, nil
}

// waitReadable parks until the socket has something to read (or its peer
// closed it), holding no buffer. The check runs inside RawConn.Read, after
// the runtime has armed its readiness flag, so no wake-up is missed.
func (p *pollingConn) waitReadable() error {
	return p.raw.Read(func(fd uintptr) bool {
		var one [1]byte
		_, _, err := syscall.Recvfrom(int(fd), one[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return !errors.Is(err, syscall.EAGAIN) // data, the end, or an error: the read will tell
	})
}

// Read buffers are shared by every stream: a stream takes one only for
// the time between a read and the end of framing what it read.
var readBufs = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}

// readBufSize is what one read takes from the socket at most.
const readBufSize = 4 << 10
