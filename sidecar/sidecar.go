// Package sidecar wires Megaphone together: the hidden node and its
// attachments to ejabberd, the client listeners, the BOSH front, and the
// operator's controls (drain, limits, the commands from ejabberd's shell).
// cmd/megaphone turns flags into a Config and runs a Sidecar.
package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/megaphone-im/megaphone/bosh"
	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

// Config is everything a sidecar needs to run.
type Config struct {
	Nodes    []string // ejabberd nodes to attach to
	Name     string   // this sidecar's node name
	Cookie   string   // the distribution cookie (read from a file by the caller)
	EPMDPort int
	// PEM files for TLS on the distribution link (node.DistTLSConfig);
	// DistTLSCA empty: plain TCP.
	DistTLSCert, DistTLSKey, DistTLSCA string

	BOSHAddr  string   // HTTP listener for BOSH and WebSocket ("": off)
	BOSHPaths []string // URL paths that serve BOSH
	// BOSHMode is "relay" (every request goes to ejabberd_bosh, the
	// default) or "edge" (the sidecar keeps the BOSH session and ejabberd
	// only its c2s; bosh/edge.go). BOSHInactivity is an edge session's
	// inactivity timeout (0: 30 s, as mod_bosh's max_inactivity).
	BOSHMode       string
	BOSHInactivity time.Duration
	WSPath         string // URL path of XMPP over WebSocket ("": off)
	C2SAddr        string // XMPP with STARTTLS ("": off)
	C2STLSAddr     string // XMPP with direct TLS ("": off)
	TLSCert        string // PEM files for client TLS
	TLSKey         string
	// ReusePort opens the client listeners with SO_REUSEPORT, so that
	// several sidecars (each its own node name) serve the same ports.
	ReusePort bool
	// TCPKeepAlive is the client connections' TCP keep-alive period (0:
	// Go's 15 s; negative: off).
	TCPKeepAlive time.Duration

	Limits       sockets.Limits
	TickInterval time.Duration // the distribution link's tick (0: node's default)
	// The HTTP listener's bounds on slow or idle clients (0: 10 s, 30 s,
	// 120 s and 16 KiB): a request's headers must arrive within
	// HTTPHeaderTimeout and the whole request within HTTPReadTimeout; a
	// keep-alive connection may idle HTTPIdleTimeout; headers over
	// HTTPMaxHeaderBytes get 431.
	HTTPHeaderTimeout, HTTPReadTimeout, HTTPIdleTimeout time.Duration
	HTTPMaxHeaderBytes                                  int
	HandshakeTimeout                                    time.Duration // a stream's opening, TLS included
	MaxWait                                             time.Duration // the longest a BOSH request waits for ejabberd
	ShutdownGrace                                       time.Duration // how long a drain on shutdown waits for streams

	// Hot upgrade (upgrade.go): where this sidecar offers its sockets to a
	// new one, where a new one takes them from, and how long the old one
	// keeps what could not move.
	HandoffSocket string
	Takeover      string
	HandoffLinger time.Duration

	AdminAddr string           // metrics, health and log level over HTTP ("": off)
	LogLevel  *zap.AtomicLevel // the level /loglevel shows and sets (nil: not served)

	// Port, if set, is the Erlang port the shim started us on
	// (megaphone:start_port/2): the bridge runs over it instead of the
	// distribution, Nodes and Cookie are not used, and the sidecar stops
	// when the port closes.
	Port net.Conn

	Version string // the build, told to the shim in the hello
	Logger  *zap.Logger
}

// The BOSH modes (Config.BOSHMode).
const (
	BOSHRelay = "relay"
	BOSHEdge  = "edge"
)

// Sidecar is one running Megaphone sidecar.
type Sidecar struct {
	cfg      Config
	log      *zap.Logger
	started  time.Time
	node     *node.Node
	attached []*node.Attachment
	distTLS  *tls.Config // the distribution link's, or nil
	registry *sockets.Registry
	front    *bosh.Handler
	certs    *sockets.Certificates // nil without TLS
	streams  *streamBackend

	mu        sync.Mutex
	listeners []net.Listener
	httpSrv   *http.Server
	upgrade   upgradeState
}

// New checks the configuration and creates the sidecar's node; nothing
// listens or dials until Run.
func New(cfg Config) (*Sidecar, error) {
	if len(cfg.Nodes) == 0 && cfg.Port == nil {
		return nil, errors.New("no ejabberd node to attach to")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = 330 * time.Second
	}
	if cfg.C2STLSAddr != "" && cfg.TLSCert == "" {
		return nil, errors.New("direct TLS (--c2s-tls-addr) needs --tls-cert and --tls-key")
	}
	switch cfg.BOSHMode {
	case "":
		cfg.BOSHMode = BOSHRelay
	case BOSHRelay, BOSHEdge:
	default:
		return nil, fmt.Errorf("BOSH mode %q: %s or %s", cfg.BOSHMode, BOSHRelay, BOSHEdge)
	}
	if cfg.HandoffLinger <= 0 {
		cfg.HandoffLinger = time.Hour
	}
	s := &Sidecar{cfg: cfg, log: cfg.Logger, started: time.Now(), registry: sockets.NewRegistry(cfg.Limits)}
	s.upgrade.handedOver = make(chan struct{})
	var n *node.Node
	var err error
	if cfg.Port == nil && (cfg.DistTLSCA != "" || cfg.DistTLSCert != "" || cfg.DistTLSKey != "") {
		if s.distTLS, err = node.DistTLSConfig(cfg.DistTLSCert, cfg.DistTLSKey, cfg.DistTLSCA); err != nil {
			return nil, err
		}
	}
	if cfg.Port != nil {
		// The shim started us as a port: the node behind it is the one
		// ejabberd node we serve, whatever was configured.
		var peer string
		if n, peer, err = node.NewPortNode(s.nodeConfig(), cfg.Port); err != nil {
			return nil, err
		}
		s.cfg.Nodes = []string{peer}
	} else if n, err = node.New(s.nodeConfig()); err != nil {
		return nil, err
	}
	s.node = n
	if cfg.TLSCert != "" {
		if s.certs, err = sockets.LoadCertificates(cfg.TLSCert, cfg.TLSKey); err != nil {
			return nil, fmt.Errorf("TLS certificate: %w", err)
		}
	}
	return s, nil
}

func (s *Sidecar) nodeConfig() node.Config {
	return node.Config{Name: s.cfg.Name, Cookie: s.cfg.Cookie, EPMDPort: s.cfg.EPMDPort, TLS: s.distTLS,
		TickInterval: s.cfg.TickInterval, Controller: s, Logger: s.cfg.Logger}
}

// Run attaches to ejabberd and serves clients until ctx ends, then drains:
// see Shutdown.
func (s *Sidecar) Run(ctx context.Context) error {
	s.log.Info("megaphone starting", zap.String("version", s.cfg.Version), zap.String("name", s.cfg.Name),
		zap.Strings("ejabberd", s.cfg.Nodes), zap.Stringer("pid", s.node.Self()))
	attachCtx, stopAttach := context.WithCancel(context.Background())
	defer stopAttach()
	// One attachment per ejabberd node; the BOSH front and the stream
	// backend spread new sessions over those attached.
	// A takeover carries on the running sidecar's attachments instead.
	if s.cfg.Takeover != "" {
		if err := s.takeOver(attachCtx); err != nil {
			return err
		}
	} else {
		for _, peer := range s.cfg.Nodes {
			s.attached = append(s.attached, s.node.Attach(attachCtx, peer, s.cfg.Version))
		}
	}
	var boshNodes []bosh.Node
	for _, a := range s.attached {
		boshNodes = append(boshNodes, a)
	}
	s.streams = &streamBackend{nodes: s.attached}
	edge := bosh.EdgeConfig{Inactivity: s.cfg.BOSHInactivity}
	if s.cfg.BOSHMode == BOSHEdge {
		edge.Streams = s.streams
	}
	s.front = bosh.NewHandler(bosh.Config{MaxWait: s.cfg.MaxWait, Logger: s.log, Edge: edge}, boshNodes...)
	s.startTakenOver()
	stopAdmin := sync.OnceFunc(s.serveAdmin())
	defer stopAdmin()
	s.upgrade.stopAdmin = stopAdmin

	serveErr := make(chan error, 8)
	s.upgrade.serveErr = serveErr
	if err := s.serveStreams(serveErr); err != nil {
		s.closeListeners()
		return err
	}
	if err := s.serveHTTP(serveErr); err != nil {
		s.closeListeners()
		return err
	}
	if err := s.offerHandoff(ctx); err != nil {
		s.closeListeners()
		return err
	}
	select {
	case err := <-serveErr:
		s.closeListeners()
		return err
	case <-ctx.Done():
	case <-s.node.Closed():
		s.log.Info("the port to ejabberd closed: stopping")
	case <-s.upgrade.handedOver:
		s.lingerAfterHandoff(ctx)
		return nil
	}
	s.Shutdown(s.cfg.ShutdownGrace)
	return nil
}

// serveHTTP starts the listener for BOSH and WebSocket, if it is on.
func (s *Sidecar) serveHTTP(serveErr chan<- error) error {
	if s.cfg.BOSHAddr == "" {
		return nil
	}
	lis, err := s.listen(roleHTTP, s.cfg.BOSHAddr, false)
	if err != nil {
		return fmt.Errorf("BOSH listener: %w", err)
	}
	mux := http.NewServeMux()
	if s.cfg.WSPath != "" {
		mux.Handle(s.cfg.WSPath, sockets.NewWebSocketHandler(s.wsConfig(), s.streams))
	}
	for _, p := range s.cfg.BOSHPaths {
		if p = strings.TrimSpace(p); p != "" {
			mux.Handle(p, s.front)
		}
	}
	srv := &http.Server{
		Handler:           mux,
		ConnContext:       func(ctx context.Context, c net.Conn) context.Context { return sockets.WithConn(ctx, c) },
		ReadHeaderTimeout: orDefault(s.cfg.HTTPHeaderTimeout, 10*time.Second),
		ReadTimeout:       orDefault(s.cfg.HTTPReadTimeout, 30*time.Second),
		WriteTimeout:      s.cfg.MaxWait + 10*time.Second, // a held long-poll's answer must get out
		IdleTimeout:       orDefault(s.cfg.HTTPIdleTimeout, 120*time.Second),
		MaxHeaderBytes:    orDefault(s.cfg.HTTPMaxHeaderBytes, 16<<10),
		ErrorLog:          zap.NewStdLog(s.log.Named("http")),
	}
	s.mu.Lock()
	s.listeners = append(s.listeners, lis)
	s.httpSrv = srv
	s.mu.Unlock()
	s.log.Info("serving BOSH", zap.String("url", "http://"+lis.Addr().String()+"/bosh"))
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			serveErr <- err
		}
	}()
	return nil
}

// serveStreams starts the XMPP client listeners that are on.
func (s *Sidecar) serveStreams(serveErr chan<- error) error {
	cfg := s.c2sConfig()
	for _, l := range []struct {
		role, addr string
		direct     bool
	}{{roleC2S, s.cfg.C2SAddr, false}, {roleC2STLS, s.cfg.C2STLSAddr, true}} {
		if l.addr == "" {
			continue
		}
		lis, err := s.listen(l.role, l.addr, true)
		if err != nil {
			return fmt.Errorf("XMPP listener: %w", err)
		}
		s.mu.Lock()
		s.listeners = append(s.listeners, lis)
		s.mu.Unlock()
		go func() {
			if err := sockets.ServeC2S(lis, cfg, s.streams, l.direct); err != nil {
				serveErr <- err
			}
		}()
		s.log.Info("serving XMPP clients", zap.String("addr", lis.Addr().String()),
			zap.Bool("direct_tls", l.direct), zap.Bool("starttls_required", !l.direct && cfg.TLS != nil))
	}
	return nil
}

func (s *Sidecar) c2sConfig() sockets.C2SConfig {
	cfg := sockets.C2SConfig{HandshakeTimeout: s.cfg.HandshakeTimeout, Logger: s.log.Named("c2s")}
	if s.certs != nil {
		cfg.TLS = s.certs.TLSConfig()
	}
	return cfg
}

func (s *Sidecar) wsConfig() sockets.WebSocketConfig {
	return sockets.WebSocketConfig{HandshakeTimeout: s.cfg.HandshakeTimeout, Logger: s.log.Named("ws")}
}

func (s *Sidecar) closeListeners() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.listeners {
		_ = l.Close()
	}
	s.listeners = nil
}

// ReloadCertificates re-reads the TLS certificate files: live connections
// keep theirs, new handshakes get the new one.
func (s *Sidecar) ReloadCertificates() error {
	if s.certs == nil {
		return nil
	}
	return s.certs.Reload()
}

// SetDraining stops (true) or resumes (false) taking new connections and
// BOSH sessions; open ones carry on. The shims are told, so
// megaphone:status() shows it.
func (s *Sidecar) SetDraining(on bool) {
	s.registry.SetDraining(on)
	if s.front != nil {
		s.front.SetDraining(on)
	}
	for _, a := range s.attached {
		a.NotifyDraining(on)
	}
	s.log.Info("draining", zap.Bool("on", on))
}

// SetLimits changes the limits while the sidecar runs.
func (s *Sidecar) SetLimits(l sockets.Limits) {
	s.registry.SetLimits(l)
	s.log.Info("limits changed", zap.Int("max_conns", l.MaxConns), zap.Int("max_conns_per_ip", l.MaxConnsPerIP),
		zap.Int64("max_body_bytes", l.MaxBodyBytes), zap.Int64("max_stanza_bytes", l.MaxStanzaBytes),
		zap.Int("max_bosh_requests_per_sec", l.MaxBOSHRequestsPerSec))
}

// Limits returns the limits in force.
func (s *Sidecar) Limits() sockets.Limits { return s.registry.Limits() }

// Shutdown drains the sidecar for good: it stops listening, answers every
// held BOSH long-poll with a system-shutdown terminate, lets XMPP streams
// end on their own for up to grace (a progress line each second), then
// ends those left with a system-shutdown stream error.
func (s *Sidecar) Shutdown(grace time.Duration) {
	s.log.Info("shutting down: draining", zap.Duration("grace", grace))
	s.SetDraining(true)
	s.closeListeners()
	if s.front != nil {
		s.front.Shutdown()
	}
	deadline := time.Now().Add(grace)
	s.mu.Lock()
	srv := s.httpSrv
	s.mu.Unlock()
	if srv != nil {
		// Answers the long-polls just ended and closes idle keep-alives.
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
		cancel()
	}
	// Bounded by the grace period: one check a second.
	for open := s.registry.Stats().Open; open > 0 && time.Now().Before(deadline); open = s.registry.Stats().Open {
		s.log.Info("draining: connections left", zap.Int("open", open),
			zap.Duration("left", time.Until(deadline).Round(time.Second)))
		time.Sleep(min(time.Second, time.Until(deadline)))
	}
	if open := s.registry.Stats().Open; open > 0 {
		s.log.Info("grace period over: ending the streams left", zap.Int("open", open))
		s.registry.EndAll("system-shutdown")
		time.Sleep(200 * time.Millisecond) // lets the stream errors reach the clients
	}
	s.log.Info("drained")
}

// orDefault is v, or def when v is zero (not set).
func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}
