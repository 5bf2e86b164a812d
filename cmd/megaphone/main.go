// Command megaphone is the Megaphone sidecar: it attaches to a running
// ejabberd node as a hidden Erlang node, owns the client sockets, and feeds
// every client request to the Megaphone shim loaded in ejabberd.
//
//	megaphone --node ejabberd@localhost --cookie-file /var/lib/ejabberd/.erlang.cookie
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sidecar"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type options struct {
	nodes         []string
	name          string
	cookieFile    string
	epmdPort      int
	boshAddr      string
	c2sAddr       string
	c2sTLSAddr    string
	tlsCert       string
	wsPath        string
	handshake     time.Duration
	tlsKey        string
	boshPaths     string
	maxBody       int64
	maxWait       time.Duration
	maxConns      int
	maxConnsPerIP int
	logFormat     string
	logLevel      string
	shutdownGrace time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println("megaphone", version)
		return
	}
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "megaphone:", err)
		os.Exit(2)
	}
	log, err := newLogger(opts.logFormat, opts.logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "megaphone:", err)
		os.Exit(2)
	}
	defer log.Sync()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, opts, log); err != nil {
		log.Error("megaphone stopped", zap.Error(err))
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("megaphone", flag.ContinueOnError)
	fs.Func("node", "ejabberd node to attach to, e.g. ejabberd@localhost (required; repeat it for each node of a cluster)", func(s string) error {
		o.nodes = append(o.nodes, s)
		return nil
	})
	fs.StringVar(&o.name, "name", "", "this sidecar's node name (default megaphone_<pid>@<host of --node>)")
	home, _ := os.UserHomeDir()
	fs.StringVar(&o.cookieFile, "cookie-file", filepath.Join(home, ".erlang.cookie"),
		"file holding the distribution cookie (must not be world-readable)")
	fs.IntVar(&o.epmdPort, "epmd-port", node.DefaultEPMDPort, "epmd port on the ejabberd host")
	fs.StringVar(&o.boshAddr, "bosh-addr", "127.0.0.1:5280", "BOSH HTTP listen address (empty: off)")
	fs.StringVar(&o.c2sAddr, "c2s-addr", "", "XMPP client listen address, e.g. 127.0.0.1:5222 (empty: off); STARTTLS is required when --tls-cert is set")
	fs.StringVar(&o.c2sTLSAddr, "c2s-tls-addr", "", "XMPP direct-TLS (XEP-0368) listen address, e.g. 127.0.0.1:5223 (empty: off; needs --tls-cert)")
	fs.DurationVar(&o.handshake, "handshake-timeout", 30*time.Second, "how long a client stream may take to open (header, STARTTLS, TLS handshake)")
	fs.StringVar(&o.wsPath, "ws-path", "/ws", "URL path of XMPP over WebSocket (RFC 7395) on the HTTP listener (empty: off)")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate chain for client TLS (reloaded on SIGHUP)")
	fs.StringVar(&o.tlsKey, "tls-key", "", "PEM private key for --tls-cert")
	fs.StringVar(&o.boshPaths, "bosh-paths", "/bosh,/http-bind", "comma-separated URL paths that serve BOSH")
	fs.Int64Var(&o.maxBody, "max-body", 256<<10, "largest BOSH request body, and the stanza limit until ejabberd says its own, in bytes (larger BOSH body: 413)")
	fs.DurationVar(&o.maxWait, "max-wait", 330*time.Second, "longest a BOSH request may wait for ejabberd")
	fs.IntVar(&o.maxConns, "max-conns", 0, "most open client connections (0: no limit)")
	fs.IntVar(&o.maxConnsPerIP, "max-conns-per-ip", 0, "most open client connections from one address (0: no limit)")
	fs.StringVar(&o.logFormat, "log-format", "console", "log format: console or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 10*time.Second, "how long to let requests finish on SIGTERM")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if len(o.nodes) == 0 {
		return o, errors.New("--node is required")
	}
	if o.name == "" {
		_, host, _ := strings.Cut(o.nodes[0], "@")
		o.name = fmt.Sprintf("megaphone_%d@%s", os.Getpid(), host)
	}
	return o, nil
}

func newLogger(format, level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.Development = false
		cfg.DisableStacktrace = true
	default:
		return nil, fmt.Errorf("unknown log format %q", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	return cfg.Build()
}

func run(ctx context.Context, o options, log *zap.Logger) error {
	cookie, err := node.ReadCookieFile(o.cookieFile)
	if err != nil {
		return err
	}
	sc, err := sidecar.New(sidecar.Config{
		Nodes: o.nodes, Name: o.name, Cookie: cookie, EPMDPort: o.epmdPort,
		BOSHAddr: o.boshAddr, BOSHPaths: strings.Split(o.boshPaths, ","), WSPath: o.wsPath,
		C2SAddr: o.c2sAddr, C2STLSAddr: o.c2sTLSAddr, TLSCert: o.tlsCert, TLSKey: o.tlsKey,
		Limits: sockets.Limits{MaxConns: o.maxConns, MaxConnsPerIP: o.maxConnsPerIP,
			MaxBodyBytes: o.maxBody, MaxStanzaBytes: o.maxBody},
		HandshakeTimeout: o.handshake, MaxWait: o.maxWait, ShutdownGrace: o.shutdownGrace,
		Version: version, Logger: log,
	})
	if err != nil {
		return err
	}
	go reloadOnHUP(ctx, sc, log)
	return sc.Run(ctx)
}

// reloadOnHUP reloads the certificate on SIGHUP; live connections keep
// theirs, new handshakes get the new one.
func reloadOnHUP(ctx context.Context, sc *sidecar.Sidecar, log *zap.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if err := sc.ReloadCertificates(); err != nil {
				log.Error("certificate reload failed; keeping the old one", zap.Error(err))
			} else {
				log.Info("certificate reloaded")
			}
		}
	}
}
