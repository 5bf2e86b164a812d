package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/sidecar"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// env is a fake environment for loadOptions.
type env map[string]string

func (e env) lookup(k string) (string, bool) { v, ok := e[k]; return v, ok }

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "megaphone.yml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func load(t *testing.T, args []string, e env) options {
	t.Helper()
	o, err := loadOptions(args, e.lookup)
	if err != nil {
		t.Fatalf("loadOptions(%q): %v", args, err)
	}
	return o
}

// Flags beat the environment, which beats the file, which beats the
// defaults, setting by setting.
func TestSettingsPrecedence(t *testing.T) {
	path := writeConfig(t, `
node: [ejabberd@localhost, ejabberd2@localhost]
bosh-addr: 127.0.0.1:6000
c2s-addr: 127.0.0.1:6001
max-conns-per-ip: 7
shutdown-grace: 45s
`)
	o := load(t, []string{"--config", path}, nil)
	if !slices.Equal(o.nodes, []string{"ejabberd@localhost", "ejabberd2@localhost"}) || o.boshAddr != "127.0.0.1:6000" ||
		o.maxConnsPerIP != 7 || o.shutdownGrace != 45*time.Second || o.maxWait != 330*time.Second {
		t.Errorf("file: %+v", o)
	}

	e := env{"MEGAPHONE_BOSH_ADDR": "127.0.0.1:7000", "MEGAPHONE_MAX_CONNS_PER_IP": "8", "MEGAPHONE_NODE": "envnode@localhost"}
	o = load(t, []string{"--config", path}, e)
	if o.boshAddr != "127.0.0.1:7000" || o.maxConnsPerIP != 8 || !slices.Equal(o.nodes, []string{"envnode@localhost"}) ||
		o.c2sAddr != "127.0.0.1:6001" {
		t.Errorf("environment over file: %+v", o)
	}

	o = load(t, []string{"--config", path, "--bosh-addr", "127.0.0.1:8000", "--node", "a@h", "--node", "b@h"}, e)
	if o.boshAddr != "127.0.0.1:8000" || o.maxConnsPerIP != 8 || !slices.Equal(o.nodes, []string{"a@h", "b@h"}) {
		t.Errorf("flags over environment: %+v", o)
	}

	// MEGAPHONE_CONFIG names the file when --config does not.
	o = load(t, nil, env{"MEGAPHONE_CONFIG": path})
	if o.configFile != path || o.boshAddr != "127.0.0.1:6000" {
		t.Errorf("MEGAPHONE_CONFIG: %+v", o)
	}
	// An empty value in the environment is a value: it turns a listener off.
	o = load(t, nil, env{"MEGAPHONE_CONFIG": path, "MEGAPHONE_C2S_ADDR": ""})
	if o.c2sAddr != "" {
		t.Errorf("empty MEGAPHONE_C2S_ADDR: c2s-addr %q", o.c2sAddr)
	}
	// A switch is set by its name alone in flags, true/false elsewhere.
	if o = load(t, []string{"--node", "a@h"}, env{"MEGAPHONE_REUSEPORT": "true"}); !o.reusePort {
		t.Errorf("MEGAPHONE_REUSEPORT=true: reuseport off")
	}
	if o = load(t, []string{"--config", writeConfig(t, "node: [a@h]\nreuseport: true\n"), "--reuseport=false"}, nil); o.reusePort {
		t.Errorf("--reuseport=false over the file: reuseport on")
	}
	// Variables that are no setting (the tests' MEGAPHONE_BIN) are not ours to judge.
	load(t, []string{"--node", "a@h"}, env{"MEGAPHONE_BIN": "/x"})
}

func TestSettingsErrors(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		args       []string
		env        env
		want       string
	}{
		{"unknown key", "node: [a@h]\nbosh-adr: 1.2.3.4:5\n", nil, nil, `line 2: unknown key "bosh-adr"`},
		{"cookie in the file", "node: [a@h]\ncookie: secret\n", nil, nil, "cookie itself is never a setting"},
		{"cookie in the environment", "", []string{"--node", "a@h"}, env{"MEGAPHONE_COOKIE": "secret"}, "MEGAPHONE_COOKIE"},
		{"config key", "config: /etc/x\n", nil, nil, `unknown key "config"`},
		{"bad duration", "node: [a@h]\nshutdown-grace: soon\n", nil, nil, "shutdown-grace"},
		{"bad number in the environment", "", []string{"--node", "a@h"}, env{"MEGAPHONE_MAX_CONNS": "many"}, "MEGAPHONE_MAX_CONNS"},
		{"not a mapping", "- node\n", nil, nil, "mapping"},
		{"nested value", "node: {a: b}\n", nil, nil, "node"},
		{"twice", "node: [a@h]\nnode: [b@h]\n", nil, nil, "twice"},
		{"no node", "bosh-addr: 127.0.0.1:1\n", nil, nil, "--node is required"},
		{"stray argument", "", []string{"--node", "a@h", "extra"}, nil, "unexpected argument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.file != "" {
				args = append(args, "--config", writeConfig(t, tc.file))
			}
			_, err := loadOptions(args, tc.env.lookup)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("the error repeats the cookie: %v", err)
			}
		})
	}
}

// The shipped example is a working config with every setting in it.
func TestExampleConfigParses(t *testing.T) {
	path := filepath.Join("..", "..", "packaging", "megaphone.yml")
	o := load(t, []string{"--config", path}, nil)
	if !slices.Equal(o.nodes, []string{"ejabberd@localhost"}) || o.cookieFile != "/var/lib/ejabberd/.erlang.cookie" ||
		o.boshPaths != "/bosh,/http-bind" || o.shutdownGrace != 30*time.Second {
		t.Errorf("example: %+v", o)
	}
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Each flag is shown, set or commented out (# key:).
	newFlagSet(&options{}).VisitAll(func(f *flag.Flag) {
		shown := regexp.MustCompile(`(?m)^(# ?)?` + regexp.QuoteMeta(f.Name) + `:`)
		if f.Name != "config" && !shown.Match(text) {
			t.Errorf("the example config does not show %s", f.Name)
		}
	})
}

func TestHelpListsEveryFlag(t *testing.T) {
	if _, err := loadOptions([]string{"--help"}, env{}.lookup); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("--help: %v", err)
	}
	var b bytes.Buffer
	usage(&b)
	newFlagSet(&options{}).VisitAll(func(f *flag.Flag) {
		if !strings.Contains(b.String(), "--"+f.Name+" ") || !strings.Contains(b.String(), envName(f.Name)) {
			t.Errorf("help does not list --%s with %s", f.Name, envName(f.Name))
		}
	})
	for _, want := range []string{"default: 127.0.0.1:5280", "default: 10s", "Precedence", "megaphone version"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, b.String())
		}
	}
}

// A reload applies the limits and log level that changed, leaves a limit
// set from ejabberd's shell alone when the file did not change it, and
// reports the rest as needing a restart.
func TestReloadAppliesLiveSettings(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	level := zap.NewAtomicLevelAt(zapcore.InfoLevel)
	path := writeConfig(t, "node: [a@localhost]\nmax-conns: 100\nmax-conns-per-ip: 5\nbosh-addr: 127.0.0.1:6000\n")
	cur := load(t, []string{"--config", path}, nil)
	sc, err := sidecar.New(sidecar.Config{Nodes: cur.nodes, Name: "reload_test@localhost", Cookie: "c",
		Limits: cur.limits(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	// As if megaphone:limits(#{max_conns => 50}) ran in ejabberd's shell.
	shell := sc.Limits()
	shell.MaxConns = 50
	sc.SetLimits(shell)

	if err := os.WriteFile(path, []byte("node: [a@localhost]\nmax-conns: 100\nmax-conns-per-ip: 1\n"+
		"bosh-addr: 127.0.0.1:6001\nlog-level: debug\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	next := load(t, []string{"--config", path}, nil)
	cur = reload(cur, next, sc, level, log)
	want := sockets.Limits{MaxConns: 50, MaxConnsPerIP: 1, MaxBodyBytes: 256 << 10, MaxStanzaBytes: 256 << 10}
	if got := sc.Limits(); got != want {
		t.Errorf("limits %+v, want %+v", got, want)
	}
	if level.Level() != zapcore.DebugLevel {
		t.Errorf("log level %v", level.Level())
	}
	restart := logs.FilterMessageSnippet("needs a restart").All()
	if len(restart) != 1 || restart[0].ContextMap()["setting"] != "bosh-addr" {
		t.Errorf("needs-restart lines: %v", restart)
	}
	done := logs.FilterMessage("config reloaded").All()
	if len(done) != 1 || !slices.Equal(done[0].ContextMap()["applied"].([]any), []any{"log-level", "max-conns-per-ip"}) {
		t.Errorf("summary: %v", done)
	}

	// The same file again changes nothing, and a bad level is refused.
	logs.TakeAll()
	cur = reload(cur, load(t, []string{"--config", path}, nil), sc, level, log)
	if got := sc.Limits(); got != want {
		t.Errorf("unchanged file moved the limits to %+v", got)
	}
	if n := logs.FilterMessageSnippet("needs a restart").Len(); n != 1 {
		t.Errorf("a reload of the same file reported %d needs-restart lines, want the bosh-addr one again", n)
	}
	bad := cur
	bad.logLevel = "loud"
	bad.values = map[string]string{}
	for k, v := range cur.values {
		bad.values[k] = v
	}
	bad.values["log-level"] = "loud"
	cur = reload(cur, bad, sc, level, log)
	if level.Level() != zapcore.DebugLevel || cur.logLevel != "debug" {
		t.Errorf("a bad level was applied: %v %q", level.Level(), cur.logLevel)
	}
}
