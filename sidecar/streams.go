package sidecar

import (
	"context"
	"sync/atomic"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sockets"
)

// streamBackend places each new client stream on an attached ejabberd
// node, in turn. A stream lives on its node until it ends.
type streamBackend struct {
	nodes []*node.Attachment
	next  atomic.Uint64
}

func (b *streamBackend) OpenStream(ctx context.Context, open etf.C2SOpen, sink sockets.StreamSink) (sockets.Stream, error) {
	start := int(b.next.Add(1))
	pick := b.nodes[start%len(b.nodes)]
	for k := range b.nodes {
		if a := b.nodes[(start+k)%len(b.nodes)]; a.Attached() {
			pick = a
			break
		}
	}
	st, err := pick.OpenStream(ctx, open, sink)
	if err != nil {
		return nil, err // not st: a nil *node.Stream would be a non-nil sockets.Stream
	}
	return st, nil
}
