package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Target is one installation of Erlang/OTP (and ejabberd) that tests run
// against: the host's (Debian 12: ejabberd 23.01, OTP 25) or the one in the
// Debian 13 chroot built by scripts/trixie-chroot.sh (ejabberd 24.12,
// OTP 27). Everything that differs between them is here; the rest of the
// harness goes through Runner.
type Target struct {
	// Name is short and safe as a subtest name: "debian12", "debian13".
	Name string
	// Desc says what it is, e.g. "ejabberd 24.12 / OTP 27.3.4.1 (Debian 13 chroot /var/cache/megaphone/trixie)".
	Desc string
	// Root is the chroot directory on this machine, "" for the host.
	Root string
	// Runner runs erl, erlc and probes for this target.
	Runner Runner
	// Erl and Erlc are the binaries as the target sees them.
	Erl, Erlc string
}

// Environment variables read by Targets.
const (
	// EnvTrixieRoot overrides where the Debian 13 chroot lives.
	EnvTrixieRoot = "MEGAPHONE_TRIXIE_ROOT"
	// EnvRequireTrixie=1 turns a missing chroot from "skip that target"
	// into an error (CI sets it, so the second target can never silently
	// drop out).
	EnvRequireTrixie = "MEGAPHONE_REQUIRE_TRIXIE"
)

// DefaultTrixieRoot is where scripts/trixie-chroot.sh builds the chroot.
const DefaultTrixieRoot = "/var/cache/megaphone/trixie"

// trixieStamp is the file scripts/trixie-chroot.sh writes once the chroot is
// complete.
const trixieStamp = ".megaphone-trixie-ready"

// TrixieRoot returns the chroot directory ($MEGAPHONE_TRIXIE_ROOT or the
// default), whether or not it exists.
func TrixieRoot() string {
	if r := os.Getenv(EnvTrixieRoot); r != "" {
		return filepath.Clean(r)
	}
	return DefaultTrixieRoot
}

// HostTarget is this machine's Erlang and ejabberd.
func HostTarget() Target {
	t := Target{Name: "debian12", Runner: HostRunner, Erl: "erl", Erlc: "erlc"}
	t.Desc = t.describe("Debian 12, host")
	return t
}

// TrixieTarget is the Debian 13 chroot, if it has been built (stamp file
// present) and its /proc and /dev are mounted. The error says what is
// missing and how to get it.
func TrixieTarget() (Target, error) {
	root := TrixieRoot()
	if _, err := os.Stat(filepath.Join(root, trixieStamp)); err != nil {
		return Target{}, fmt.Errorf("harness: no Debian 13 chroot at %s (%s missing): build it with scripts/trixie-chroot.sh (make deps-trixie)",
			root, trixieStamp)
	}
	for _, m := range []string{"proc/self", "dev/null", "dev/pts/ptmx"} {
		if _, err := os.Stat(filepath.Join(root, m)); err != nil {
			return Target{}, fmt.Errorf("harness: Debian 13 chroot at %s is not mounted (%v): run scripts/trixie-chroot.sh", root, err)
		}
	}
	t := Target{
		Name:   "debian13",
		Root:   root,
		Runner: PrefixRunner{Prefix: []string{"chroot", root}, Root: root},
		Erl:    "erl",
		Erlc:   "erlc",
	}
	t.Desc = t.describe("Debian 13 chroot " + root)
	return t, nil
}

// Targets returns every target available here: the host always, the
// Debian 13 chroot when it is built. With MEGAPHONE_REQUIRE_TRIXIE=1 a
// missing chroot is an error instead of a shorter list.
func Targets() ([]Target, error) {
	ts := []Target{HostTarget()}
	trixie, err := TrixieTarget()
	switch {
	case err == nil:
		ts = append(ts, trixie)
	case os.Getenv(EnvRequireTrixie) == "1":
		return ts, fmt.Errorf("%w (%s=1)", err, EnvRequireTrixie)
	}
	return ts, nil
}

// Options fills in the target's Runner and erl in opts.
func (t Target) Options(opts Options) Options {
	opts.Runner, opts.Erl = t.Runner, t.Erl
	return opts
}

// TempDir creates a new directory under the target's /tmp and returns its
// path on this machine (t.Runner.NodePath gives the target's view). Files a
// node must read (cookie, config, code) have to live inside its root.
func (t Target) TempDir(pattern string) (string, error) {
	return os.MkdirTemp(tempBase(t.Runner), pattern)
}

// tempBase is where temporary instance directories go for r: the target's
// /tmp when r runs behind a different root, the usual temp dir otherwise.
func tempBase(r Runner) string {
	if p := r.HostPath("/tmp"); p != "/tmp" {
		return p
	}
	return ""
}

// OTPRelease returns the full OTP version of the target ("27.3.4.1"), or
// "" when it cannot be read.
func (t Target) OTPRelease() string {
	matches, _ := filepath.Glob(t.Runner.HostPath("/usr/lib/erlang/releases/*/OTP_VERSION"))
	sort.Strings(matches)
	for i := len(matches) - 1; i >= 0; i-- {
		if b, err := os.ReadFile(matches[i]); err == nil {
			return strings.TrimSpace(string(b))
		}
	}
	return ""
}

// EjabberdVersion returns the version in the ejabberd application
// directory's name ("24.12"), or "" when ejabberd is not installed.
func (t Target) EjabberdVersion() string {
	dir, err := FindEjabberd(t.Runner)
	if err != nil {
		return ""
	}
	v := strings.TrimPrefix(filepath.Base(dir), "ejabberd-")
	if i := strings.IndexByte(v, '-'); i > 0 {
		v = v[:i] // Debian revision
	}
	return v
}

func (t Target) describe(where string) string {
	ej, otp := t.EjabberdVersion(), t.OTPRelease()
	if ej == "" {
		ej = "(not installed)"
	}
	if otp == "" {
		otp = "(not installed)"
	}
	return fmt.Sprintf("ejabberd %s / OTP %s (%s)", ej, otp, where)
}

// BuildShim compiles the shim's sources (srcDir on this machine: *.erl and
// megaphone.app.src) with the target's own erlc, into a new directory inside
// the target, and writes ebin/megaphone.app with the module list filled in
// (what rebar3 does on the host). It returns the ebin directory as the
// target's node sees it (for LoadShim) and a function that removes it.
//
// Why per target: a .beam is only guaranteed to load on the OTP that
// compiled it and a few releases after; compiling with each node's own
// compiler sidesteps the question and also catches sources that a newer
// compiler warns about.
func (t Target) BuildShim(ctx context.Context, srcDir string) (ebin string, cleanup func(), err error) {
	ctx, cancel := withDefaultTimeout(ctx, 2*time.Minute)
	defer cancel()
	erls, _ := filepath.Glob(filepath.Join(srcDir, "*.erl"))
	appSrc := filepath.Join(srcDir, "megaphone.app.src")
	if len(erls) == 0 {
		return "", nil, fmt.Errorf("harness: no *.erl in %s", srcDir)
	}
	dir, err := t.TempDir("megaphone-shim-")
	if err != nil {
		return "", nil, fmt.Errorf("harness: %w", err)
	}
	cleanup = func() { os.RemoveAll(dir) }
	fail := func(err error) (string, func(), error) {
		cleanup()
		return "", nil, err
	}
	src, out := filepath.Join(dir, "src"), filepath.Join(dir, "ebin")
	for _, d := range []string{src, out} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fail(fmt.Errorf("harness: %w", err))
		}
	}
	var nodeSrcs []string
	for _, f := range append(erls, appSrc) {
		b, err := os.ReadFile(f)
		if err != nil {
			return fail(fmt.Errorf("harness: %w", err))
		}
		dst := filepath.Join(src, filepath.Base(f))
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			return fail(fmt.Errorf("harness: %w", err))
		}
		if strings.HasSuffix(f, ".erl") {
			nodeSrcs = append(nodeSrcs, t.Runner.NodePath(dst))
		}
	}
	np := t.Runner.NodePath
	env := baseEnv(np(dir))

	// The same options as rebar.config's erl_opts.
	args := []string{"-o", np(out), "+debug_info", "+warn_unused_vars", "+warn_shadow_vars",
		"+warn_obsolete_guard", "-Werror"}
	if msg, err := runCapture(ctx, t.Runner, t.Erlc, env, append(args, nodeSrcs...)...); err != nil {
		return fail(fmt.Errorf("harness: %s (%s) on the shim: %v\n%s", t.Erlc, t.Name, err, msg))
	}

	// megaphone.app = megaphone.app.src plus {modules, [...]}. Paths come
	// in through the environment, so the code below is constant.
	const mkApp = `{ok, [{application, Name, Props}]} = file:consult(os:getenv("MGPH_APP_SRC")),
Mods = lists:sort([list_to_atom(filename:basename(F, ".beam"))
                   || F <- filelib:wildcard(filename:join(os:getenv("MGPH_EBIN"), "*.beam"))]),
App = {application, Name, lists:keystore(modules, 1, Props, {modules, Mods})},
ok = file:write_file(os:getenv("MGPH_APP"), io_lib:format("~p.~n", [App])),
halt(0).`
	env = baseEnv(np(dir),
		"MGPH_APP_SRC="+np(filepath.Join(src, "megaphone.app.src")),
		"MGPH_EBIN="+np(out),
		"MGPH_APP="+np(filepath.Join(out, "megaphone.app")),
	)
	if msg, err := runCapture(ctx, t.Runner, t.Erl, env, "-noshell", "-noinput", "-eval", mkApp); err != nil {
		return fail(fmt.Errorf("harness: writing megaphone.app (%s): %v\n%s", t.Name, err, msg))
	}
	if _, err := os.Stat(filepath.Join(out, "megaphone.app")); err != nil {
		return fail(fmt.Errorf("harness: megaphone.app not written: %w", err))
	}
	return np(out), cleanup, nil
}

// runCapture runs bin through r (bounded by ctx) and returns its combined
// output.
func runCapture(ctx context.Context, r Runner, bin string, env []string, args ...string) (string, error) {
	cmd := r.Command(bin, env, args...)
	var buf strings.Builder
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := runBounded(ctx, cmd)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return strings.TrimSpace(buf.String()), err
}
