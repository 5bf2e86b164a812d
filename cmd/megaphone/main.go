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
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sidecar"
	"go.uber.org/zap"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println("megaphone", version)
		return
	}
	opts, err := loadOptions(os.Args[1:], os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		usage(os.Stdout)
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "megaphone:", err)
		fmt.Fprintln(os.Stderr, "megaphone --help lists the flags")
		os.Exit(2)
	}
	log, level, err := newLogger(opts.logFormat, opts.logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "megaphone:", err)
		os.Exit(2)
	}
	defer log.Sync()
	gogc, from := applyGCPercent(opts.gcPercent, os.LookupEnv)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if from == "gc-percent" && opts.gcPercent >= 0 && opts.gcPercentBusy > opts.gcPercent {
		go newGCGoal(opts.gcPercent, opts.gcPercentBusy, log).run(ctx)
		gogc += "; " + strconv.Itoa(opts.gcPercentBusy) + " while busy"
	}
	log.Info("garbage collector", zap.String("gogc", gogc), zap.String("from", from))
	if err := run(ctx, opts, log, level); err != nil {
		log.Error("megaphone stopped", zap.Error(err))
		os.Exit(1)
	}
}

// applyGCPercent sets the collector's goal from --gc-percent unless GOGC is
// in the environment: the runtime has applied that one already, and an
// operator who set it meant it. It returns the value in force and where it
// came from.
func applyGCPercent(percent int, lookupEnv func(string) (string, bool)) (gogc, from string) {
	if v, set := lookupEnv("GOGC"); set {
		return v, "GOGC"
	}
	debug.SetGCPercent(percent)
	if percent < 0 {
		return "off", "gc-percent"
	}
	return strconv.Itoa(percent), "gc-percent"
}

func newLogger(format, level string) (*zap.Logger, zap.AtomicLevel, error) {
	lvl, err := zap.ParseAtomicLevel(level)
	if err != nil {
		return nil, lvl, err
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
		return nil, lvl, fmt.Errorf("unknown log format %q", format)
	}
	cfg.Level = lvl
	log, err := cfg.Build()
	return log, lvl, err
}

func run(ctx context.Context, o options, log *zap.Logger, level zap.AtomicLevel) error {
	var cookie string
	var port net.Conn
	var err error
	if o.carrier == "port" {
		// stdout carries the bridge: the logs go to stderr (zap's default).
		if port, err = node.StdioConn(); err != nil {
			return err
		}
	} else if cookie, err = node.ReadCookieFile(o.cookieFile); err != nil {
		return err
	}
	sc, err := sidecar.New(sidecar.Config{
		Nodes: o.nodes, Name: o.name, Cookie: cookie, EPMDPort: o.epmdPort, Port: port,
		DistTLSCert: o.distTLSCert, DistTLSKey: o.distTLSKey, DistTLSCA: o.distTLSCA,
		BOSHAddr: o.boshAddr, BOSHPaths: strings.Split(o.boshPaths, ","), WSPath: o.wsPath,
		C2SAddr: o.c2sAddr, C2STLSAddr: o.c2sTLSAddr, TLSCert: o.tlsCert, TLSKey: o.tlsKey,
		ReusePort: o.reusePort, TCPKeepAlive: keepAlive(o.tcpKeepAlive),
		Limits:       o.limits(),
		TickInterval: o.tickInterval, HandshakeTimeout: o.handshake,
		HTTPHeaderTimeout: o.httpHeaderTimeout, HTTPReadTimeout: o.httpReadTimeout,
		HTTPIdleTimeout: o.httpIdleTimeout, HTTPMaxHeaderBytes: o.httpMaxHeaderBytes, MaxWait: o.maxWait, BOSHMode: o.boshMode, BOSHInactivity: o.boshInactivity, ShutdownGrace: o.shutdownGrace,
		AdminAddr: o.adminAddr, LogLevel: &level,
		HandoffSocket: o.handoffSocket, Takeover: o.takeover, HandoffLinger: o.handoffLinger,
		Version: version, Logger: log,
	})
	if err != nil {
		return err
	}
	if o.configFile != "" {
		log.Info("settings read", zap.String("config", o.configFile))
	}
	go reloadOnHUP(ctx, o, sc, level, log)
	go upgradeOnUSR2(ctx, o, sc, log)
	return sc.Run(ctx)
}

// keepAlive turns --tcp-keepalive into net.ListenConfig's terms, where 0
// means Go's default and negative means off.
func keepAlive(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}
