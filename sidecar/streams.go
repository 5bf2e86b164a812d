package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
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

// serveC2S starts the XMPP client listeners that are switched on.
func serveC2S(ctx context.Context, o options, ids *sockets.IDs, limits sockets.Limits, backend *streamBackend, log *zap.Logger) error {
	if o.c2sAddr == "" && o.c2sTLSAddr == "" {
		return nil
	}
	cfg := sockets.C2SConfig{MaxStanzaBytes: o.maxBody, HandshakeTimeout: o.handshake, Logger: log.Named("c2s")}
	if o.tlsCert != "" {
		certs, err := sockets.LoadCertificates(o.tlsCert, o.tlsKey)
		if err != nil {
			return fmt.Errorf("TLS certificate: %w", err)
		}
		cfg.TLS = certs.TLSConfig()
		go reloadOnHUP(ctx, certs, log)
	} else if o.c2sTLSAddr != "" {
		return fmt.Errorf("--c2s-tls-addr needs --tls-cert and --tls-key")
	}
	for _, l := range []struct {
		addr   string
		direct bool
	}{{o.c2sAddr, false}, {o.c2sTLSAddr, true}} {
		if l.addr == "" {
			continue
		}
		lis, err := sockets.Listen(l.addr, ids, limits, log)
		if err != nil {
			return fmt.Errorf("XMPP listener: %w", err)
		}
		go func() { <-ctx.Done(); lis.Close() }()
		go func() {
			if err := sockets.ServeC2S(lis, cfg, backend, l.direct); err != nil {
				log.Error("XMPP listener stopped", zap.Error(err))
			}
		}()
		log.Info("serving XMPP clients", zap.String("addr", lis.Addr().String()),
			zap.Bool("direct_tls", l.direct), zap.Bool("starttls_required", !l.direct && cfg.TLS != nil))
	}
	return nil
}

// reloadOnHUP reloads the certificate on SIGHUP; live connections keep
// theirs, new handshakes get the new one.
func reloadOnHUP(ctx context.Context, certs *sockets.Certificates, log *zap.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if err := certs.Reload(); err != nil {
				log.Error("certificate reload failed; keeping the old one", zap.Error(err))
			} else {
				log.Info("certificate reloaded")
			}
		}
	}
}
