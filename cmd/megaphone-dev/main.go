// Command megaphone-dev is what `make run` runs: a private ejabberd on
// loopback (its config, node, spool and logs under .run/ in the repo), the
// shim loaded into it through a remote shell exactly as the README tells an
// operator to, two demo users, and the sidecar in the foreground. Ctrl-C
// stops everything it started.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

const (
	sidecarBOSH  = "127.0.0.1:5280" // BOSH at /bosh, WebSocket at /ws
	sidecarC2S   = "127.0.0.1:5222" // XMPP, STARTTLS required
	sidecarTLS   = "127.0.0.1:5223" // XMPP, direct TLS
	sidecarAdmin = "127.0.0.1:9280" // /metrics, /healthz, /loglevel
	nativeC2S    = 5322             // ejabberd's own listeners, for side-by-side comparison
	nativeHTTP   = 5380
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "megaphone-dev:", err)
		os.Exit(1)
	}
}

func run() error {
	bin, ebin := os.Getenv("MEGAPHONE_BIN"), os.Getenv("MEGAPHONE_SHIM_EBIN")
	if bin == "" || ebin == "" {
		return fmt.Errorf("set MEGAPHONE_BIN and MEGAPHONE_SHIM_EBIN (make run does)")
	}
	password := os.Getenv("DEMO_PASSWORD")
	if password == "" {
		password = "demo"
	}
	dir, err := filepath.Abs(filepath.Join(".run", "ejabberd"))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	fmt.Println("starting a private ejabberd in", dir)
	ej, err := harness.Start(ctx, harness.Options{Name: "megaphone_dev", Dir: dir,
		C2SPort: nativeC2S, HTTPPort: nativeHTTP, StartTimeout: time.Minute})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("stopping ejabberd", ej.Node)
		_ = ej.Stop()
	}()
	for _, user := range []string{"alice", "bob"} {
		if err := ej.Register(ctx, user, "localhost", password); err != nil {
			return err
		}
	}
	fmt.Println("loading the shim from an erl remote shell, as an operator would:")
	out, err := ej.LoadShim(ctx, ebin)
	fmt.Println(out)
	if err != nil {
		return err
	}

	cert, key, err := harness.SelfSignedCert(filepath.Join(filepath.Dir(dir), "tls"))
	if err != nil {
		return err
	}
	sidecar := exec.Command(bin, "--node", ej.Node, "--cookie-file", ej.CookieFile, "--bosh-addr", sidecarBOSH,
		"--c2s-addr", sidecarC2S, "--c2s-tls-addr", sidecarTLS, "--tls-cert", cert, "--tls-key", key,
		"--admin-addr", sidecarAdmin)
	sidecar.Stdout, sidecar.Stderr = os.Stdout, os.Stderr
	sidecar.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := sidecar.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- sidecar.Wait() }()

	fmt.Printf(`
================================================================
 Megaphone is serving.

 BOSH through the sidecar:   http://%s/bosh
 WebSocket (RFC 7395):       ws://%s/ws
 XMPP, STARTTLS required:    %s
 XMPP, direct TLS:           %s   (self-signed certificate in %s)
 ejabberd's own BOSH:        http://127.0.0.1:%d/bosh   (for comparison)
 ejabberd's own XMPP (c2s):  127.0.0.1:%d
 Sidecar metrics:            http://%s/metrics   (also /healthz, /loglevel)

 Demo users:                 alice@localhost, bob@localhost
 Password:                   %s   (set DEMO_PASSWORD to change)

 ejabberd node:              %s
 Cookie file:                %s
 Logs:                       %s

 Shell on the node:          HOME=%s erl -sname ctl -hidden -remsh %s
   then: megaphone:status().  megaphone:connections().
 Ctrl-C stops everything.
================================================================
`, sidecarBOSH, sidecarBOSH, sidecarC2S, sidecarTLS, filepath.Dir(cert), nativeHTTP, nativeC2S, sidecarAdmin, password, ej.Node, ej.CookieFile, ej.LogFile, ej.Dir, ej.Node)

	select {
	case err := <-exited:
		return fmt.Errorf("sidecar exited: %v", err)
	case <-ctx.Done():
	}
	fmt.Println("\nstopping the sidecar")
	_ = sidecar.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(15 * time.Second):
		_ = sidecar.Process.Kill()
		<-exited
	}
	return nil
}
