package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Why a pseudo-terminal: on OTP 25 `erl -remsh` only connects to the remote
// node when its stdin is a terminal. With piped stdin user_drv cannot open
// its tty port and silently falls back to a plain local shell (user:start/0),
// ignoring -remsh: the commands would run on the ctl node, not on ejabberd.
// So Shell gives erl a pty, checks that the prompt is the remote node's
// "(<Node>)1> " and types the commands.
//
// How it ends without touching the remote node: in a real remsh, q(),
// halt() and init:stop() are evaluated ON the remote node (q(). stops
// ejabberd). Shell instead uses the job-control menu, which runs in the local
// user_drv: Ctrl-G, then "q" = halt() of the local ctl node only. If that
// does not end it within a few seconds, the local ctl process (only it, by
// PID) gets SIGTERM, then SIGKILL.

// Commands that would stop the remote node when typed into a remsh.
var remoteStopRE = regexp.MustCompile(`^(c:)?q\(\)$|^(erlang:)?halt\(.*\)$|^init:(stop|reboot|restart)\(.*\)$`)

var ansiRE = regexp.MustCompile("\x1b\\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\a")

// Shell runs commands in a remote shell on the node, the way an operator
// would: `erl -sname ctl_<rand>@localhost -hidden -remsh <Node>` with
// HOME=Dir, each command a complete shell expression ending with '.' (a
// command without the '.' continues on the next line, as when typing a
// multi-line expression; the last command gets a '.' if it lacks one). It
// returns the transcript (prompts, echoed input, printed output) from the
// first prompt on. Commands that would stop the remote node (q(), halt(),
// init:stop()) are refused: use Stop. An error is returned if the remote
// prompt does not appear, the remote shell dies, or ejabberd exited. Without
// a ctx deadline the call is bounded to 30 s.
func (e *Ejabberd) Shell(ctx context.Context, commands ...string) (string, error) {
	if e.exited() {
		return "", fmt.Errorf("harness: Shell: node %s is not running", e.Node)
	}
	var lines []string
	for _, c := range commands {
		if c = strings.TrimSpace(c); c != "" {
			lines = append(lines, c)
		}
	}
	if n := len(lines); n > 0 && !strings.HasSuffix(lines[n-1], ".") {
		lines[n-1] += "."
	}
	var input strings.Builder
	for _, c := range lines {
		compact := strings.Join(strings.Fields(strings.TrimSuffix(c, ".")), "")
		if remoteStopRE.MatchString(compact) {
			return "", fmt.Errorf("harness: Shell: refusing %q: in a remote shell it stops the ejabberd node; use Stop", c)
		}
		input.WriteString(c)
		input.WriteString("\n")
	}
	tok := randHex(6)
	endMark := "@@MGPH-END-" + tok + "@@"
	// The printed text differs from the echoed source, so the mark is seen
	// only once everything typed before it has been evaluated.
	endCmd := `io:put_chars(["@@MGPH", "-END-` + tok + `@@", 10]).`
	input.WriteString(endCmd + "\n")

	ctx, cancel := withDefaultTimeout(ctx, 30*time.Second)
	defer cancel()

	master, slave, err := openPTY(50, 1000)
	if err != nil {
		return "", fmt.Errorf("harness: Shell: %w", err)
	}
	defer master.Close()

	ctl := "ctl_" + randHex(5) + "@" + ErlNodeHost()
	// A terminal type with cursor capabilities is required: with TERM=dumb
	// (or an unknown TERM) OTP 25's tty_sl refuses the terminal and erl falls
	// back to the local-only shell. vt100 is in ncurses-base everywhere.
	env := baseEnv(e.runner.NodePath(e.Dir), "TERM=vt100")
	args := append([]string{"-sname", ctl, "-hidden"}, e.distArgs()...)
	args = append(args, "-remsh", e.Node)
	cmd := e.runner.Command(e.erl, env, args...)
	cmd.Dir = e.Dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	slave.Close()
	if err != nil {
		return "", fmt.Errorf("harness: Shell: start %s: %w", e.erl, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	tr := newTranscript()
	go tr.readFrom(master)

	// endLocal ends the local ctl node (never the remote one) and reaps it.
	endLocal := func(graceful bool) {
		if graceful {
			select {
			case <-exited:
				return
			case <-time.After(5 * time.Second):
			}
			_ = cmd.Process.Signal(syscall.SIGTERM) // local init:stop of the ctl node
			select {
			case <-exited:
				return
			case <-time.After(3 * time.Second):
			}
		}
		select {
		case <-exited:
			return
		default:
		}
		killTree(cmd.Process.Pid)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
	}
	fail := func(format string, a ...any) (string, error) {
		endLocal(false)
		return cleanTranscript(tr.String(), e.Node, ""),
			fmt.Errorf("harness: Shell on %s: %s\n%s", e.Node, fmt.Sprintf(format, a...), tr.String())
	}

	remotePrompt := "(" + e.Node + ")"
	localPrompt := "(" + ctl + ")"
	const shellDied = "Shell process terminated"
	var problem string
	err = tr.waitFor(ctx, func(s string) bool {
		switch {
		case strings.Contains(s, remotePrompt):
			return true
		case strings.Contains(s, localPrompt):
			problem = "got a local shell instead of a remote shell (is stdin a tty?)"
			return true
		case strings.Contains(s, shellDied):
			problem = "remote shell could not be started (node down or cookie mismatch?)"
			return true
		}
		return false
	})
	if err != nil {
		return fail("waiting for the remote prompt: %v", err)
	}
	if problem != "" {
		return fail("%s", problem)
	}

	writeErr := make(chan error, 1)
	go func() {
		_, err := io.WriteString(master, input.String())
		writeErr <- err
	}()
	err = tr.waitFor(ctx, func(s string) bool {
		if strings.Contains(s, endMark) {
			return true
		}
		if strings.Contains(s, shellDied) {
			problem = "the remote shell died"
			return true
		}
		return false
	})
	if err != nil {
		return fail("waiting for the commands to finish: %v", err)
	}
	if problem != "" {
		return fail("%s", problem)
	}
	select {
	case err := <-writeErr:
		if err != nil {
			return fail("writing commands: %v", err)
		}
	default:
	}
	mark := tr.Len()

	// Ctrl-G opens the local job-control menu; "q" halts the local node.
	if _, err := master.Write([]byte{0x07}); err == nil {
		jctx, jcancel := context.WithTimeout(ctx, 5*time.Second)
		if tr.waitFor(jctx, func(s string) bool { return strings.Contains(s[min(mark, len(s)):], "-->") }) == nil {
			_, _ = master.Write([]byte("q\n"))
		}
		jcancel()
	}
	endLocal(true)

	out := cleanTranscript(tr.String(), e.Node, tok)
	if e.exited() {
		return out, fmt.Errorf("harness: Shell: ejabberd node %s exited during the shell session", e.Node)
	}
	return out, nil
}

// cleanTranscript turns raw pty output into plain text: CRLF -> LF, escape
// sequences dropped, cut from the first remote prompt to just before the
// end-marker command, redrawn prompt lines dropped.
func cleanTranscript(raw, node, tok string) string {
	s := strings.ReplaceAll(raw, "\r\n", "\n")
	s = strings.ReplaceAll(s, "\r", "")
	s = ansiRE.ReplaceAllString(s, "")
	if i := strings.Index(s, "("+node+")"); i >= 0 {
		s = s[i:]
	}
	if tok != "" {
		if i := strings.Index(s, `io:put_chars(["@@MGPH", "-END-`+tok); i >= 0 {
			if j := strings.LastIndexByte(s[:i], '\n'); j >= 0 {
				s = s[:j+1]
			} else {
				s = ""
			}
		}
	}
	// OTP 26+'s line editor redraws the input line when Enter is pressed,
	// so each prompt line shows up twice once the cursor moves are gone.
	lines := strings.Split(s, "\n")
	kept := lines[:0]
	for i, l := range lines {
		if i > 0 && l == lines[i-1] && strings.HasPrefix(l, "("+node+")") {
			continue
		}
		kept = append(kept, l)
	}
	s = strings.Join(kept, "\n")
	return strings.TrimRight(s, " \n") + "\n"
}

// transcript accumulates everything read from the pty master.
type transcript struct {
	mu     sync.Mutex
	buf    []byte
	notify chan struct{}
	eof    chan struct{}
}

func newTranscript() *transcript {
	return &transcript{notify: make(chan struct{}, 1), eof: make(chan struct{})}
}

func (t *transcript) readFrom(r io.Reader) {
	defer close(t.eof)
	b := make([]byte, 8192)
	for i := 0; i < 1_000_000; i++ { // bounded: ~8 GB at most
		n, err := r.Read(b)
		if n > 0 {
			t.mu.Lock()
			t.buf = append(t.buf, b[:n]...)
			t.mu.Unlock()
			select {
			case t.notify <- struct{}{}:
			default:
			}
		}
		if err != nil { // EIO once the child side is gone, or master closed
			return
		}
	}
}

func (t *transcript) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

func (t *transcript) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.buf)
}

var errPTYClosed = errors.New("terminal closed")

// waitFor returns nil as soon as pred holds for the transcript, or an error
// when ctx ends or the terminal closes first. Bounded by ctx and a wake-up
// count.
func (t *transcript) waitFor(ctx context.Context, pred func(string) bool) error {
	for i := 0; i < 1_000_000; i++ {
		if pred(t.String()) {
			return nil
		}
		select {
		case <-t.notify:
		case <-t.eof:
			if pred(t.String()) {
				return nil
			}
			return errPTYClosed
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return errors.New("too many wake-ups")
}
