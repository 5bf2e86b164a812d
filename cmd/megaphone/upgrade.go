package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/sidecar"
	"go.uber.org/zap"
)

// upgradeOnUSR2 starts the binary now installed at our path as our
// successor on SIGUSR2: it takes over this process's sockets and clients
// (--takeover on our --handoff-socket). Started by us, it runs in our
// systemd unit; once it has everything, systemd is told it is the unit's
// main process, so `systemctl reload`, `stop` and the journal follow it.
// This is the upgrade of a running service: install the new binary over
// the old, then `systemctl kill -s USR2 --kill-whom=main megaphone`.
func upgradeOnUSR2(ctx context.Context, o options, sc *sidecar.Sidecar, log *zap.Logger) {
	onSignal(ctx, syscall.SIGUSR2, sc.HandedOver(), func() {
		if o.handoffSocket == "" {
			log.Error("SIGUSR2: no --handoff-socket to hand over on; not upgrading")
			return
		}
		if err := startSuccessor(ctx, o, sc, log); err != nil {
			log.Error("SIGUSR2: the new binary did not take over; carrying on", zap.Error(err))
		}
	})
}

// startSuccessor runs our executable's path (the new binary, if one was
// installed over ours) with our arguments and --takeover, and waits until
// it has taken over or has failed.
func startSuccessor(ctx context.Context, o options, sc *sidecar.Sidecar, log *zap.Logger) error {
	exe, err := os.Executable() // the path, even after the file was replaced
	if err != nil {
		return err
	}
	cmd := exec.Command(exe, append(withoutTakeover(os.Args[1:]), "--takeover", o.handoffSocket)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.Env = withoutTakeoverEnv(os.Environ())
	if err := cmd.Start(); err != nil {
		return err
	}
	log.Info("SIGUSR2: started the new binary to take over", zap.String("path", exe), zap.Int("pid", cmd.Process.Pid))
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case <-sc.HandedOver():
		if err := notifyMainPID(cmd.Process.Pid); err != nil {
			log.Warn("could not tell systemd the new main process", zap.Error(err))
		}
		return nil
	case err := <-exited:
		return fmt.Errorf("it exited: %v", err)
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		return fmt.Errorf("it did not take over within a minute")
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		return ctx.Err()
	}
}

// withoutTakeover drops a --takeover setting from args: a successor's own
// successor takes over from it, on the same handoff socket.
func withoutTakeover(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := strings.TrimLeft(args[i], "-")
		switch {
		case a == "takeover" && args[i] != a:
			i++ // and its value
		case strings.HasPrefix(a, "takeover=") && args[i] != a:
		default:
			out = append(out, args[i])
		}
	}
	return out
}

func withoutTakeoverEnv(env []string) []string {
	var out []string
	for _, e := range env {
		if !strings.HasPrefix(e, envName("takeover")+"=") {
			out = append(out, e)
		}
	}
	return out
}

// notifyMainPID tells systemd (sd_notify, when it runs us) that pid is now
// the unit's main process. The unit needs NotifyAccess=main.
func notifyMainPID(pid int) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil // not under systemd
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:] // an abstract socket
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte("MAINPID=" + strconv.Itoa(pid)))
	return err
}
