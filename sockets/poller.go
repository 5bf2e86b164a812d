package sockets

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// An idle stream should cost no goroutine: a goroutine parked in a read
// keeps its stack (4 KiB at least, docs/EVENTLOOP.md) for as long as the
// client is quiet. So once a stream's reader has drained its socket, with
// no unit half read and nothing decrypted waiting in TLS, it registers the
// socket with this poller, armed for one wake-up (EPOLLONESHOT), and ends.
// When the socket becomes readable (or its peer hangs up), the poller
// starts a fresh reader goroutine, which drains it and parks again.
//
// The Go runtime keeps the same descriptor in its own epoll set (that is
// what makes deadlines and RawConn work); one descriptor may sit in two
// sets. Ours is level-triggered and one-shot: arming a socket that already
// holds data reports it at once, so no wake-up is lost between the last
// read and the arming.
//
// A descriptor leaves the poller before it is closed (pollingConn.leave,
// from Conn.Close): the kernel drops an epoll registration only when the
// last reference to the socket goes, and a socket handed to another
// process (hot upgrade) lives on. Events carry a token, never the
// descriptor's number, so an event for a socket that left is ignored.
//
// The poller waits in the Go runtime's own netpoller, not in a blocking
// epoll_wait: an epoll descriptor is itself pollable (readable while it
// has events), so ours sits in the runtime's set like a socket, and the
// poller's goroutine parks like any reader. A goroutine blocked in a
// system call holds an OS thread, and the runtime's sysmon keeps waking
// every 20 µs to hand its processor on: sysmon's share of the sidecar's
// CPU in a chat on this project's VM fell from 8.7% to 5.6% with this
// (BENCH.md, "The idle poller waits in the runtime").
type poller struct {
	epfd int
	file *os.File // owns epfd and holds it in the runtime's netpoller

	mu        sync.Mutex
	sockets   map[uint64]*pollingConn // registered sockets by token
	lastToken uint64
}

var (
	pollerOnce   sync.Once
	sharedPoller *poller
	pollerErr    error
)

// idlePoller returns the process's poller, started on first use.
func idlePoller() (*poller, error) {
	pollerOnce.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			pollerErr = err
			return
		}
		// Non-blocking before os.NewFile, which then registers it with
		// the runtime's netpoller instead of treating it as a plain file.
		if err := unix.SetNonblock(epfd, true); err != nil {
			_ = unix.Close(epfd)
			pollerErr = err
			return
		}
		file := os.NewFile(uintptr(epfd), "idle-poller")
		raw, err := file.SyscallConn()
		if err != nil {
			_ = file.Close()
			pollerErr = err
			return
		}
		sharedPoller = &poller{epfd: epfd, file: file, sockets: make(map[uint64]*pollingConn)}
		go sharedPoller.run(raw)
	})
	return sharedPoller, pollerErr
}

// armFlags: readable, peer closed (errors and hang-ups are always
// reported), one wake-up per arming.
const armFlags = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

// run hands each ready socket to a fresh reader, for the life of the
// process. One goroutine serves all parked streams; while nothing is
// ready it is parked in the runtime's netpoller, holding no thread.
func (p *poller) run(raw syscall.RawConn) {
	events := make([]unix.EpollEvent, 256)
	for {
		var n int
		var werr error
		// Read calls the function until it reports done, parking the
		// goroutine in between until the runtime sees our epoll
		// descriptor readable. A timeout of 0 never blocks the thread.
		err := raw.Read(func(fd uintptr) bool {
			n, werr = unix.EpollWait(int(fd), events, 0)
			return n > 0 || werr != nil
		})
		if err == nil {
			err = werr
		}
		if errors.Is(err, unix.EINTR) {
			continue // look again at once: parking now could miss an event
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond) // cannot happen on a valid epoll fd; do not spin if it does
			continue
		}
		for _, ev := range events[:n] {
			token := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			p.mu.Lock()
			pc := p.sockets[token]
			p.mu.Unlock()
			if pc != nil {
				pc.readable(token)
			}
		}
	}
}

func (p *poller) add(pc *pollingConn) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastToken++
	p.sockets[p.lastToken] = pc
	return p.lastToken
}

func (p *poller) remove(token uint64) {
	p.mu.Lock()
	delete(p.sockets, token)
	p.mu.Unlock()
}

// registered counts the sockets in the poller (tests).
func (p *poller) registered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sockets)
}

// ctl adds, re-arms or removes fd for token.
func (p *poller) ctl(op, fd int, token uint64) error {
	ev := unix.EpollEvent{Events: armFlags, Fd: int32(uint32(token)), Pad: int32(uint32(token >> 32))}
	return unix.EpollCtl(p.epfd, op, fd, &ev)
}

// parkedReader is the stream a parked socket belongs to: readOn runs a
// new reader on it, on a goroutine of its own.
type parkedReader interface {
	readOn()
}

// Where a stream's reader is (pollingConn.state).
const (
	readerRunning = iota // a goroutine reads the stream, or waits in it
	readerParked         // no goroutine: the socket is armed in the poller
	readerClosed         // the socket is closing: never park again
)

// park registers the socket with the poller, armed for one wake-up, and
// reports whether it did: the caller's goroutine must then end without
// touching the stream again, since a new reader may already run. It does
// not park a socket that is closing or has no owner to wake.
func (pc *pollingConn) park() bool {
	p, err := idlePoller()
	if err != nil {
		return false
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.state != readerRunning || pc.owner == nil {
		return false
	}
	op, token := unix.EPOLL_CTL_MOD, pc.token
	if token == 0 {
		op, token = unix.EPOLL_CTL_ADD, p.add(pc)
	}
	var cerr error
	// Control holds the descriptor open: it cannot be closed (and its
	// number reused) under the ctl.
	if err := pc.raw.Control(func(fd uintptr) { cerr = p.ctl(op, int(fd), token) }); err != nil || cerr != nil {
		if op == unix.EPOLL_CTL_ADD {
			p.remove(token)
		}
		return false
	}
	pc.token, pc.state = token, readerParked
	return true
}

// readable runs on the poller: the socket has input (or an error, or the
// peer hung up). A reader already running (woken otherwise) ignores it.
func (pc *pollingConn) readable(token uint64) {
	pc.mu.Lock()
	wake := pc.state == readerParked && pc.token == token
	if wake {
		pc.state = readerRunning
	}
	pc.mu.Unlock()
	if wake {
		go pc.owner.readOn()
	}
}

// unpark starts a reader on a parked stream without waiting for input:
// a takeover stops streams through their reader. The socket stays armed;
// the wake-up it may still give is ignored.
func (pc *pollingConn) unpark() {
	pc.mu.Lock()
	wake := pc.state == readerParked
	if wake {
		pc.state = readerRunning
	}
	pc.mu.Unlock()
	if wake {
		go pc.owner.readOn()
	}
}

// leave takes the socket out of the poller for good, before it is closed;
// a parked stream gets a reader, which finds the socket closed and ends
// the stream.
func (pc *pollingConn) leave() {
	pc.mu.Lock()
	wake := pc.state == readerParked
	pc.state = readerClosed
	if token := pc.token; token != 0 {
		pc.token = 0
		p, _ := idlePoller() // the token says it exists
		// If the descriptor is already closed, so is its registration
		// here (nothing else held the socket) or it is unreachable (the
		// token is forgotten below, so its events are ignored).
		_ = pc.raw.Control(func(fd uintptr) { _ = p.ctl(unix.EPOLL_CTL_DEL, int(fd), token) })
		p.remove(token)
	}
	pc.mu.Unlock()
	if wake {
		go pc.owner.readOn()
	}
}
