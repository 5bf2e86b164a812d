package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Runner is the single place where erl command lines become processes.
//
// The default (HostRunner) runs the erl binary of this machine. The Debian 13
// target (ejabberd 24.12 / OTP 27 in a chroot, see Targets) is
// PrefixRunner{Prefix: []string{"chroot", root}, Root: root}: everything else
// in this package goes through Command and NodePath/HostPath.
type Runner interface {
	// Command returns an unstarted command running erl (as seen by the node)
	// with args. env is the complete environment for the erl process.
	Command(erl string, env []string, args ...string) *exec.Cmd
	// NodePath maps a path on this machine to the path the erl process sees
	// (identity on the host, "strip the chroot dir" for a chroot).
	NodePath(hostPath string) string
	// HostPath maps a path as seen by the erl process to a path on this
	// machine (identity on the host, "prepend the chroot dir" for a chroot).
	HostPath(nodePath string) string
}

// PrefixRunner runs erl behind an optional command prefix (for example
// {"chroot", "/srv/deb13"}) whose filesystem root is Root ("" or "/" = host).
type PrefixRunner struct {
	Prefix []string
	Root   string
}

// HostRunner runs erl directly on this machine.
var HostRunner Runner = PrefixRunner{}

func (r PrefixRunner) Command(erl string, env []string, args ...string) *exec.Cmd {
	argv := append(append(append([]string{}, r.Prefix...), erl), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	return cmd
}

func (r PrefixRunner) root() string {
	if r.Root == "" || r.Root == "/" {
		return ""
	}
	return filepath.Clean(r.Root)
}

func (r PrefixRunner) NodePath(hostPath string) string {
	root := r.root()
	if root == "" {
		return hostPath
	}
	rel, err := filepath.Rel(root, hostPath)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return hostPath // outside the root: caller's problem, keep it visible
	}
	return "/" + rel
}

func (r PrefixRunner) HostPath(nodePath string) string {
	root := r.root()
	if root == "" {
		return nodePath
	}
	return filepath.Join(root, nodePath)
}

// ejabberdLibPatterns are tried in order (as paths seen by the node) to find
// the ejabberd application directory, e.g. /usr/lib/x86_64-linux-gnu/ejabberd-23.01-1.
var ejabberdLibPatterns = []string{
	"/usr/lib/x86_64-linux-gnu/ejabberd-*",
	"/usr/lib/*-linux-gnu*/ejabberd-*",
	"/usr/lib/ejabberd-*",
	"/usr/lib/erlang/lib/ejabberd-*",
	"/usr/local/lib/erlang/lib/ejabberd-*",
	"/opt/ejabberd*/lib/ejabberd-*",
}

// FindEjabberd returns the ejabberd application directory (the one holding
// ebin/ejabberd.app) as seen by the node, detected through r. Symlinked
// aliases (Debian ships ejabberd-23.01 -> ejabberd-23.01-1) are collapsed;
// when several versions exist the lexically highest one wins.
func FindEjabberd(r Runner) (string, error) {
	if r == nil {
		r = HostRunner
	}
	for _, pat := range ejabberdLibPatterns {
		matches, _ := filepath.Glob(r.HostPath(pat))
		seen := map[string]string{} // resolved host path -> node path
		for _, m := range matches {
			if _, err := os.Stat(filepath.Join(m, "ebin", "ejabberd.app")); err != nil {
				continue
			}
			resolved, err := filepath.EvalSymlinks(m)
			if err != nil {
				resolved = m
			}
			// Prefer the real directory name over a symlink alias.
			if _, dup := seen[resolved]; !dup || m == resolved {
				seen[resolved] = r.NodePath(resolved)
			}
		}
		if len(seen) == 0 {
			continue
		}
		var dirs []string
		for _, d := range seen {
			dirs = append(dirs, d)
		}
		sort.Strings(dirs)
		return dirs[len(dirs)-1], nil
	}
	return "", fmt.Errorf("harness: ejabberd not found (looked for %s); install it with scripts/deps.sh",
		strings.Join(ejabberdLibPatterns, ", "))
}

// baseEnv is the environment handed to every erl process: the current one
// minus anything that could change how erl/ejabberd behave or which cookie
// they read, plus HOME=dir (so $HOME/.erlang.cookie is the instance cookie).
func baseEnv(home string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "HOME", k == "TERM",
			strings.HasPrefix(k, "ERL_"), strings.HasPrefix(k, "EJABBERD"),
			strings.HasPrefix(k, "MGPH_"),
			k == "CONTRIB_MODULES_PATH", k == "CONTRIB_MODULES_CONF_DIR",
			k == "RUN_ERL_LOG_ALTERNATE", k == "ELIXIR_ERL_OPTIONS":
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		"HOME="+home,
		// If erl has to start epmd itself, keep it on loopback.
		"ERL_EPMD_ADDRESS=127.0.0.1",
	)
	return append(env, extra...)
}

// loopbackDist keeps the Erlang distribution listener of every node we
// start (server, probes, remote shells) on 127.0.0.1.
var loopbackDist = []string{"-kernel", "inet_dist_use_interface", "{127,0,0,1}"}
