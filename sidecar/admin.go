package sidecar

import (
	"net"
	"net/http"
	"time"

	"github.com/megaphone-im/megaphone/metrics"
	"go.uber.org/zap"
)

// serveAdmin starts the admin endpoint (metrics, health, log level) and
// returns what stops it. Run stops it last, after the drain, so a drain
// can be watched on it. An address that cannot be had is logged, not
// fatal: serving clients matters more than metrics, and a new sidecar
// taking over from an old one finds the old one still on it.
func (s *Sidecar) serveAdmin() (stop func()) {
	if s.cfg.AdminAddr == "" {
		return func() {}
	}
	lis, err := net.Listen("tcp", s.cfg.AdminAddr)
	if err != nil {
		s.log.Error("admin endpoint (metrics) not served", zap.String("addr", s.cfg.AdminAddr), zap.Error(err))
		return func() {}
	}
	srv := &http.Server{
		Handler: metrics.AdminHandler(metrics.Sources{Registry: s.registry, BOSH: s.front,
			Attachments: s.attached, Version: s.cfg.Version}, s.cfg.LogLevel),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		ErrorLog:          zap.NewStdLog(s.log.Named("admin")),
	}
	go func() { _ = srv.Serve(lis) }()
	s.log.Info("serving the admin endpoint", zap.String("metrics", "http://"+lis.Addr().String()+"/metrics"))
	return func() { _ = srv.Close() }
}
