package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/megaphone-im/megaphone/sidecar"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

// limits are the sidecar's limits as the settings give them; --max-body is
// also the stanza limit until ejabberd says its own.
func (o options) limits() sockets.Limits {
	return sockets.Limits{MaxConns: o.maxConns, MaxConnsPerIP: o.maxConnsPerIP,
		MaxBodyBytes: o.maxBody, MaxStanzaBytes: o.maxBody, MaxBOSHRequestsPerSec: o.maxBOSHRate}
}

// liveSettings are those a reload applies to the running sidecar; a change
// to any other needs a restart.
var liveSettings = map[string]bool{"max-conns": true, "max-conns-per-ip": true, "max-body": true,
	"max-bosh-requests-per-sec": true, "log-level": true}

// reloadOnHUP re-reads the settings (flags, environment, config file) on
// each SIGHUP until ctx ends; see reload.
func reloadOnHUP(ctx context.Context, cur options, sc *sidecar.Sidecar, level zap.AtomicLevel, log *zap.Logger) {
	onSignal(ctx, syscall.SIGHUP, nil, func() {
		next, err := loadOptions(os.Args[1:], os.LookupEnv)
		if err != nil {
			log.Error("config reload failed; keeping the running settings", zap.Error(err))
		} else {
			cur = reload(cur, next, sc, level, log)
		}
		if err := sc.ReloadCertificates(); err != nil {
			log.Error("certificate reload failed; keeping the old one", zap.Error(err))
		} else if cur.tlsCert != "" {
			log.Info("certificate reloaded", zap.String("tls-cert", cur.tlsCert))
		}
	})
}

// onSignal runs act on each sig, one at a time, until ctx ends or stop is
// closed (a nil stop never is).
func onSignal(ctx context.Context, sig os.Signal, stop <-chan struct{}, act func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, sig)
	defer signal.Stop(ch)
	for {
		select {
		case <-ctx.Done():
			return
		case <-stop:
			return
		case <-ch:
			act()
		}
	}
}

// reload applies what changed between cur and next and returns the
// settings now in force. Only the limits that changed in the settings are
// set, so a limit changed from ejabberd's shell (megaphone:limits/1) stays
// until the file changes that same limit.
func reload(cur, next options, sc *sidecar.Sidecar, level zap.AtomicLevel, log *zap.Logger) options {
	var changed, needRestart []string
	for _, name := range sortedKeys(next.values) {
		was, now := cur.values[name], next.values[name]
		if was == now {
			continue
		}
		if !liveSettings[name] {
			needRestart = append(needRestart, name)
			log.Warn("setting changed; it needs a restart, and the running value stays",
				zap.String("setting", name), zap.String("running", was), zap.String("new", now))
			continue
		}
		changed = append(changed, name)
		log.Info("setting changed", zap.String("setting", name), zap.String("from", was), zap.String("to", now))
	}
	applied := cur
	if next.limits() != cur.limits() {
		l, was, now := sc.Limits(), cur.limits(), next.limits()
		if now.MaxConns != was.MaxConns {
			l.MaxConns = now.MaxConns
		}
		if now.MaxConnsPerIP != was.MaxConnsPerIP {
			l.MaxConnsPerIP = now.MaxConnsPerIP
		}
		if now.MaxBodyBytes != was.MaxBodyBytes {
			l.MaxBodyBytes, l.MaxStanzaBytes = now.MaxBodyBytes, now.MaxStanzaBytes
		}
		if now.MaxBOSHRequestsPerSec != was.MaxBOSHRequestsPerSec {
			l.MaxBOSHRequestsPerSec = now.MaxBOSHRequestsPerSec
		}
		sc.SetLimits(l)
		applied.maxConns, applied.maxConnsPerIP, applied.maxBody = next.maxConns, next.maxConnsPerIP, next.maxBody
		applied.maxBOSHRate = next.maxBOSHRate
	}
	applied.values = make(map[string]string, len(cur.values))
	for name, v := range cur.values {
		applied.values[name] = v
		if liveSettings[name] {
			applied.values[name] = next.values[name]
		}
	}
	log.Info("config reloaded", zap.String("config", next.configFile),
		zap.Strings("applied", changed), zap.Strings("needs_restart", needRestart))
	// The level last, so that the lines above show at the level they were
	// written under even when the new one is quieter.
	if next.logLevel != cur.logLevel {
		if err := level.UnmarshalText([]byte(next.logLevel)); err != nil {
			log.Error("bad log level; keeping the running one", zap.String("log-level", next.logLevel), zap.Error(err))
		} else {
			applied.logLevel = next.logLevel
		}
	}
	applied.values["log-level"] = applied.logLevel // a bad one was not applied
	return applied
}
