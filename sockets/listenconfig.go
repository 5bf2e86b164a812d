package sockets

import (
	"context"
	"errors"
	"net"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ListenConfig says how a client listener's socket is opened.
type ListenConfig struct {
	// ReusePort sets SO_REUSEPORT before the bind, so that several sidecar
	// processes (each its own hidden node) can listen on the same address:
	// the kernel spreads new connections over them by a hash of the
	// connection's addresses. It is how one host serves more client
	// sockets than one process may open (the open-files limit). Linux lets
	// only sockets of the same user join such a group.
	ReusePort bool
	// KeepAlive is the TCP keep-alive period of accepted connections: 0
	// is Go's default (15 s), negative turns keep-alive off. Every idle
	// connection sends a probe (and gets an ACK) each period: at 15 s and
	// 140,000 connections on one host that is ~19,000 packets a second,
	// which overflowed loopback's packet backlog in the scale run
	// (BENCH.md) and cut sessions whose probes went unanswered.
	KeepAlive time.Duration
}

// Listen opens a TCP listener on addr for HTTP (BOSH, WebSocket).
func (lc ListenConfig) Listen(addr string, registry *Registry, log *zap.Logger) (*Listener, error) {
	return lc.listen(addr, registry, log, false)
}

// ListenStreams opens a TCP listener on addr for XMPP streams.
func (lc ListenConfig) ListenStreams(addr string, registry *Registry, log *zap.Logger) (*Listener, error) {
	return lc.listen(addr, registry, log, true)
}

func (lc ListenConfig) listen(addr string, registry *Registry, log *zap.Logger, streams bool) (*Listener, error) {
	nlc := net.ListenConfig{KeepAlive: lc.KeepAlive}
	if lc.ReusePort {
		nlc.Control = setReusePort
	}
	inner, err := nlc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Listener{Listener: inner, registry: registry, log: log, streams: streams}, nil
}

func setReusePort(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	return serr
}

// acceptBackoff bounds the pause after a failed accept that may pass (no
// descriptor left, no buffer): the connection waits in the kernel's
// backlog and is taken once a descriptor is free, instead of the listener
// (and with it the sidecar) giving up.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// retryableAccept reports whether an accept error may pass on its own:
// the process or the system is out of descriptors or memory for a moment,
// or the client gave up before it was accepted.
func retryableAccept(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
