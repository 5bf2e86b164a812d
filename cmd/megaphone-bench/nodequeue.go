package main

import (
	"context"

	"github.com/megaphone-im/megaphone/test/harness"
)

// Each side of the benchmark runs on a fresh node, and a fresh node is
// slow to be ready: ~5 s to boot and load the shim, then ~9 s until
// mseg_alloc has unmapped the carriers the boot left in its cache, which
// the baseline measurement waits for (measure). So the next side's node is
// started while this side's sessions idle: its boot is over before this
// side chats (chat waits for it), and its cache drains meanwhile. A beam
// that only boots does not touch this side's figures: they are per
// process, and the kernel's (global) socket figure moves by the new
// node's few sockets, against N sessions.

// nodeQueue hands out the node of each side in the run's order.
type nodeQueue struct {
	c       config
	users   []int // users to register on each upcoming side's node, in order
	pending *nodeFuture
}

// nodeFuture is a node being started in the background.
type nodeFuture struct {
	users int
	done  chan struct{}
	nd    *node
	err   error
}

// benchNodeOptions is every benchmark node's configuration.
var benchNodeOptions = harness.Options{BOSHInactivity: boshInactivity}

// plannedUsers lists, in the order run measures them, the users each
// side's node needs: one per session, or the chat's pairs if more.
func plannedUsers(c config) []int {
	var users []int
	natives := map[nativeKey]bool{}
	for _, kind := range c.kinds {
		for i, n := range c.ns {
			chat := i == 0 && c.pairs > 0
			u := sideUsers(c, n, chat)
			users = append(users, u) // the Megaphone side
			if key := (nativeKey{kind.client(), n, chat}); !natives[key] {
				natives[key] = true
				users = append(users, u)
			}
		}
	}
	return users
}

// sideUsers is how many users a side's node needs: one per session, or
// the chat's pairs if more.
func sideUsers(c config, n int, chat bool) int {
	if chat {
		return max(n, 2*c.pairs)
	}
	return n
}

// take returns the node for a side that needs users: the one started
// ahead if it was started for as many, or a new one. The caller stops it.
func (q *nodeQueue) take(ctx context.Context, users int) (*node, error) {
	if len(q.users) > 0 {
		q.users = q.users[1:]
	}
	f := q.pending
	q.pending = nil
	if f != nil {
		<-f.done
		if f.err == nil && f.users == users {
			return f.nd, nil
		}
		if f.err == nil {
			f.nd.ej.Stop() // a side failed and the order moved on: not this side's node
		}
	}
	return startNode(ctx, q.c, users, benchNodeOptions)
}

// startNext starts the next side's node in the background, if there is a
// next side and it is not started yet.
func (q *nodeQueue) startNext(ctx context.Context) {
	if q.pending != nil || len(q.users) == 0 {
		return
	}
	f := &nodeFuture{users: q.users[0], done: make(chan struct{})}
	q.pending = f
	go func() {
		defer close(f.done)
		f.nd, f.err = startNode(ctx, q.c, f.users, benchNodeOptions)
	}()
}

// waitNext waits until the node started ahead, if any, is ready, so that
// its boot does not run beside a measurement of throughput.
func (q *nodeQueue) waitNext() {
	if q.pending != nil {
		<-q.pending.done
	}
}

// close stops a node started ahead for a side that did not run.
func (q *nodeQueue) close() {
	if f := q.pending; f != nil {
		q.pending = nil
		<-f.done
		if f.err == nil {
			f.nd.ej.Stop()
		}
	}
}
