package sidecar

import (
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/megaphone-im/megaphone/metrics"
	"go.uber.org/zap"
)

// adminRetry is how often a taken admin address is tried again.
const adminRetry = 2 * time.Second

// serveAdmin starts the admin endpoint (metrics, health, log level) and
// returns what stops it. Run stops it last, after the drain, so a drain
// can be watched on it. An address that is taken is not fatal: serving
// clients matters more than metrics, and a new sidecar taking over from
// an old one finds the old one still on it, so it is tried again until it
// is free.
func (s *Sidecar) serveAdmin() (stop func()) {
	if s.cfg.AdminAddr == "" {
		return func() {}
	}
	srv := &http.Server{
		Handler: metrics.AdminHandler(metrics.Sources{Registry: s.registry, BOSH: s.front,
			Attachments: s.attached, Version: s.cfg.Version}, s.cfg.LogLevel),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    8 << 10, // a scraper's request is small
		ErrorLog:          zap.NewStdLog(s.log.Named("admin")),
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for warned := false; ; warned = true {
			lis, err := net.Listen("tcp", s.cfg.AdminAddr)
			if err == nil {
				s.log.Info("serving the admin endpoint", zap.String("metrics", "http://"+lis.Addr().String()+"/metrics"))
				_ = srv.Serve(lis) // until stop; closes lis
				return
			}
			if !warned {
				s.log.Error("admin endpoint (metrics) not served yet; retrying until its address is free",
					zap.String("addr", s.cfg.AdminAddr), zap.Error(err))
			}
			select {
			case <-done:
				return
			case <-time.After(adminRetry):
			}
		}
	}()
	return func() {
		close(done)
		_ = srv.Close() // also makes a Serve that has not begun return at once
		wg.Wait()
	}
}
