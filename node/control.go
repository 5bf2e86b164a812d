package node

import (
	"context"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// Controller answers the operator's commands that reach the sidecar from
// ejabberd's shell (megaphone:status(), connections(), kick(), ...).
type Controller interface {
	// Control runs one command for the shim on peer and returns the result
	// term. It may take a while (listing 100,000 connections): it runs on
	// a goroutine of its own, never on the link's reader.
	Control(ctx context.Context, peer string, cmd etf.ControlCommand) etf.Term
}

// controlTimeout bounds one command; the shell waits a little longer.
const controlTimeout = 5 * time.Second

// maxConcurrentControls bounds the commands running at once, so a flood of
// them (from a confused script, or a hostile node) cannot pile up
// goroutines; the excess is answered {error, busy}.
const maxConcurrentControls = 4

// startControl runs a command on a goroutine of its own, if a slot is free.
// It runs on the link's reader, so it never waits.
func (a *Attachment) startControl(l *Link, req etf.ControlRequest) {
	select {
	case a.node.controlSlots <- struct{}{}:
		go func() {
			defer func() { <-a.node.controlSlots }()
			a.control(l, req)
		}()
	default:
		_ = l.Send(req.ReplyTo, etf.ControlReply(req.Ref, etf.ControlError("busy")))
	}
}

// control runs one command and answers the process that asked.
func (a *Attachment) control(l *Link, req etf.ControlRequest) {
	ctrl := a.node.cfg.Controller
	if ctrl == nil {
		_ = l.Send(req.ReplyTo, etf.ControlReply(req.Ref, etf.ControlError("not_supported")))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	result := ctrl.Control(ctx, a.peer, req.Command)
	if err := l.Send(req.ReplyTo, etf.ControlReply(req.Ref, result)); err != nil {
		a.log.Debug("control reply not sent", zap.Error(err))
	}
}

// NotifyDraining tells the shim whether this sidecar takes new
// connections, for megaphone:status() on the ejabberd side.
func (a *Attachment) NotifyDraining(on bool) {
	a.mu.Lock()
	s := a.cur
	a.mu.Unlock()
	if s != nil && s.version >= 2 { // version 1 shims do not know the message
		_ = s.send(etf.SidecarDraining(on))
	}
}
