package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/megaphone-im/megaphone/node"
	"go.yaml.in/yaml/v3"
)

// Where a setting comes from, strongest first: a flag, the environment
// (MEGAPHONE_<FLAG>), the config file (a key named like the flag), the
// default. The flag set is the one list of settings: the file's keys and
// the environment's names are derived from the flag names, so the three
// can never disagree.

// envPrefix starts every environment variable that sets a flag.
const envPrefix = "MEGAPHONE_"

// configEnv names the config file when --config is not given.
const configEnv = envPrefix + "CONFIG"

type options struct {
	configFile   string
	nodes        []string
	tickInterval time.Duration

	httpHeaderTimeout, httpReadTimeout, httpIdleTimeout time.Duration
	httpMaxHeaderBytes                                  int
	carrier                                             string
	name                                                string
	cookieFile                                          string
	epmdPort                                            int
	boshAddr                                            string
	c2sAddr                                             string
	c2sTLSAddr                                          string
	reusePort                                           bool
	tcpKeepAlive                                        time.Duration
	gcPercent                                           int
	gcPercentBusy                                       int
	tlsCert                                             string
	wsPath                                              string
	handshake                                           time.Duration
	tlsKey                                              string
	boshPaths                                           string
	maxBody                                             int64
	maxWait                                             time.Duration
	boshMode                                            string
	boshInactivity                                      time.Duration
	maxConns                                            int
	maxConnsPerIP                                       int
	maxBOSHRate                                         int
	logFormat                                           string
	logLevel                                            string
	shutdownGrace                                       time.Duration
	adminAddr                                           string
	handoffSocket                                       string
	takeover                                            string
	handoffLinger                                       time.Duration
	distTLSCert                                         string
	distTLSKey                                          string
	distTLSCA                                           string

	// values holds every setting as its flag prints it, to tell what a
	// reload changed.
	values map[string]string
}

// newFlagSet defines every setting on o.
func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("megaphone", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // main prints errors and usage itself
	fs.StringVar(&o.configFile, "config", "", "YAML config file whose keys are these flags' names (also "+configEnv+")")
	fs.Func("node", "ejabberd node to attach to, e.g. ejabberd@localhost (required; repeat it for each node of a cluster; in the file a list, in the environment comma-separated)", func(s string) error {
		for _, n := range strings.Split(s, ",") {
			if n = strings.TrimSpace(n); n != "" {
				o.nodes = append(o.nodes, n)
			}
		}
		return nil
	})
	fs.StringVar(&o.carrier, "carrier", "dist", "how to reach ejabberd: dist (a hidden node; --node, --cookie-file) or port (started by the shim with megaphone:start_port/2, over stdin/stdout)")
	fs.StringVar(&o.name, "name", "", "this sidecar's node name (default megaphone_<pid>@<host of --node>)")
	home, _ := os.UserHomeDir()
	fs.StringVar(&o.cookieFile, "cookie-file", filepath.Join(home, ".erlang.cookie"),
		"file holding the distribution cookie (must not be world-readable; the cookie itself is never a setting)")
	fs.IntVar(&o.epmdPort, "epmd-port", node.DefaultEPMDPort, "epmd port on the ejabberd host")
	fs.StringVar(&o.distTLSCA, "dist-tls-ca", "", "PEM CA that signs ejabberd's distribution certificate: set it to speak TLS on the distribution link, to a node started with -proto_dist inet_tls (empty: plain TCP)")
	fs.StringVar(&o.distTLSCert, "dist-tls-cert", "", "PEM certificate the sidecar presents on a TLS distribution link (for ssl_dist's fail_if_no_peer_cert)")
	fs.StringVar(&o.distTLSKey, "dist-tls-key", "", "PEM private key for --dist-tls-cert")
	fs.StringVar(&o.boshAddr, "bosh-addr", "127.0.0.1:5280", "BOSH HTTP listen address (empty: off)")
	fs.StringVar(&o.c2sAddr, "c2s-addr", "", "XMPP client listen address, e.g. 127.0.0.1:5222 (empty: off); STARTTLS is required when --tls-cert is set")
	fs.StringVar(&o.c2sTLSAddr, "c2s-tls-addr", "", "XMPP direct-TLS (XEP-0368) listen address, e.g. 127.0.0.1:5223 (empty: off; needs --tls-cert)")
	fs.BoolVar(&o.reusePort, "reuseport", false, "open the client listeners (BOSH/WebSocket, XMPP, direct TLS) with SO_REUSEPORT, so that several sidecars on one host serve the same ports, the kernel spreading new connections over them; give each its own node name (the default one is), --admin-addr and --handoff-socket")
	fs.DurationVar(&o.tcpKeepAlive, "tcp-keepalive", 15*time.Second, "TCP keep-alive period of client connections (0 or negative: off). Each idle connection sends a probe each period: with hundreds of thousands of connections on one host, a longer period (e.g. 5m) saves packets and CPU; XMPP's own pings find dead clients too")
	fs.IntVar(&o.gcPercent, "gc-percent", 50, "how far the Go heap may grow over what is live before a collection (Go's GOGC; a GOGC in the environment wins; negative: off). 50, not Go's 100: an idle connection keeps ~2 KiB live, and at 100 the runtime holds as much again between collections; 50 cut the sidecar's memory per idle stream by a fifth, with no loss of chat throughput measured (BENCH.md)")
	fs.IntVar(&o.gcPercentBusy, "gc-percent-busy", 0, "the collector's goal while the sidecar allocates more than 2 MiB a second (traffic, logins), back to --gc-percent after 3 quiet seconds with the heap given back to the system (0, or not above --gc-percent, or a GOGC in the environment: off). The collector's CPU per byte allocated goes as 1/goal: at 400 the sidecar spent a third less CPU per BOSH message at the edge than at 50, but sessions that logged in while it was busy cost 1.4-3.6 KiB more each once idle (BENCH.md): a trade for CPU-bound sidecars")
	fs.DurationVar(&o.tickInterval, "tick-interval", 15*time.Second, "how often an idle distribution link ticks; the link is declared dead after 4 ticks (plus 5 s) of silence from ejabberd. Set it to ejabberd's net_ticktime/4 (the default suits net_ticktime 60)")
	fs.DurationVar(&o.httpHeaderTimeout, "http-header-timeout", 10*time.Second, "how long an HTTP request's headers may take to arrive (slow clients are cut)")
	fs.DurationVar(&o.httpReadTimeout, "http-read-timeout", 30*time.Second, "how long a whole HTTP request may take to arrive (a slow body gets 400)")
	fs.DurationVar(&o.httpIdleTimeout, "http-idle-timeout", 120*time.Second, "how long an HTTP keep-alive connection may idle between requests")
	fs.IntVar(&o.httpMaxHeaderBytes, "http-max-header-bytes", 16<<10, "largest HTTP request header block, in bytes (larger: 431)")
	fs.DurationVar(&o.handshake, "handshake-timeout", 30*time.Second, "how long a client stream may take to open (header, STARTTLS, TLS handshake)")
	fs.StringVar(&o.wsPath, "ws-path", "/ws", "URL path of XMPP over WebSocket (RFC 7395) on the HTTP listener (empty: off)")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate chain for client TLS (reloaded on SIGHUP)")
	fs.StringVar(&o.tlsKey, "tls-key", "", "PEM private key for --tls-cert")
	fs.StringVar(&o.boshPaths, "bosh-paths", "/bosh,/http-bind", "comma-separated URL paths that serve BOSH")
	fs.Int64Var(&o.maxBody, "max-body", 256<<10, "largest BOSH request body, and the stanza limit until ejabberd says its own, in bytes (larger BOSH body: 413; SIGHUP applies it)")
	fs.DurationVar(&o.maxWait, "max-wait", 330*time.Second, "longest a BOSH request may wait for ejabberd")
	fs.StringVar(&o.boshMode, "bosh-mode", "relay", "relay: every BOSH request goes to ejabberd's own BOSH handler (ejabberd_bosh); edge: the sidecar keeps BOSH sessions itself and ejabberd runs only each session's c2s (one process instead of three; no hot upgrade while edge sessions are open)")
	fs.DurationVar(&o.boshInactivity, "bosh-inactivity", 30*time.Second, "with --bosh-mode edge: how long a BOSH session may go without a request before it ends (mod_bosh's max_inactivity)")
	fs.IntVar(&o.maxConns, "max-conns", 0, "most open client connections (0: no limit; SIGHUP applies it)")
	fs.IntVar(&o.maxConnsPerIP, "max-conns-per-ip", 0, "most open client connections from one address (0: no limit; SIGHUP applies it)")
	fs.IntVar(&o.maxBOSHRate, "max-bosh-requests-per-sec", 0, "most requests a second one BOSH session may make, in bursts of as many; a session over it is ended with a policy-violation terminate (0: no limit; SIGHUP applies it)")
	fs.StringVar(&o.logFormat, "log-format", "console", "log format: console or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error (SIGHUP applies it; also PUT /loglevel on --admin-addr)")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 10*time.Second, "how long SIGTERM lets XMPP streams end on their own before ending them")
	fs.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:9280", "admin HTTP listen address: /metrics (Prometheus), /healthz, /loglevel (empty: off)")
	fs.StringVar(&o.handoffSocket, "handoff-socket", "", "unix socket on which a new sidecar binary (--takeover) may take over this one's sockets and clients (empty: off)")
	fs.StringVar(&o.takeover, "takeover", "", "take over the running sidecar listening on this handoff socket, instead of starting afresh (its node name and sockets are carried on)")
	fs.DurationVar(&o.handoffLinger, "handoff-linger", time.Hour, "after a takeover, how long the old process keeps what could not move (TLS streams, held BOSH requests) before ending it")
	return fs
}

// envName is the environment variable for a flag: MEGAPHONE_BOSH_ADDR for
// --bosh-addr.
func envName(flagName string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// errSecretSetting refuses the cookie as a value anywhere: it would end up
// in argv, the environment of every child, or a config file's backups.
var errSecretSetting = errors.New("the cookie itself is never a setting: put it in a file (mode 0400) and give cookie-file")

// loadOptions reads the settings from args, the environment (lookupEnv)
// and the config file, strongest first.
func loadOptions(args []string, lookupEnv func(string) (string, bool)) (options, error) {
	// A first pass over args finds the config file and what the command
	// line sets, which neither the file nor the environment may override.
	var probe options
	fs := newFlagSet(&probe)
	if err := fs.Parse(args); err != nil {
		return probe, err
	}
	if fs.NArg() > 0 {
		return probe, fmt.Errorf("unexpected argument %q (settings are flags: --name value)", fs.Arg(0))
	}
	fromArgs := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { fromArgs[f.Name] = true })
	path := probe.configFile
	if !fromArgs["config"] {
		path, _ = lookupEnv(configEnv)
	}
	if _, ok := lookupEnv(envPrefix + "COOKIE"); ok {
		return probe, fmt.Errorf("%sCOOKIE: %w", envPrefix, errSecretSetting)
	}

	var o options
	fs = newFlagSet(&o)
	fromEnv := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) {
		if v, ok := lookupEnv(envName(f.Name)); ok && !fromArgs[f.Name] && f.Name != "config" {
			fromEnv[f.Name] = v
		}
	})
	if path != "" {
		entries, err := readConfigFile(path, fs)
		if err != nil {
			return o, err
		}
		for _, e := range entries {
			if _, inEnv := fromEnv[e.key]; fromArgs[e.key] || inEnv {
				continue
			}
			for _, v := range e.values {
				if err := fs.Set(e.key, v); err != nil {
					return o, fmt.Errorf("%s: line %d: %s: %w", path, e.line, e.key, err)
				}
			}
		}
	}
	for _, name := range sortedKeys(fromEnv) {
		if err := fs.Set(name, fromEnv[name]); err != nil {
			return o, fmt.Errorf("%s: %w", envName(name), err)
		}
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	o.configFile = path
	switch {
	case o.carrier == "port":
		if o.name == "" {
			o.name = fmt.Sprintf("megaphone_port_%d", os.Getpid())
		}
	case o.carrier != "dist":
		return o, fmt.Errorf("--carrier %q: dist or port", o.carrier)
	case len(o.nodes) == 0:
		return o, errors.New("--node is required (or node: in the config file, or " + envName("node") + ")")
	}
	if o.name == "" {
		_, host, _ := strings.Cut(o.nodes[0], "@")
		o.name = fmt.Sprintf("megaphone_%d@%s", os.Getpid(), host)
	}
	o.values = map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { o.values[f.Name] = f.Value.String() })
	o.values["node"] = strings.Join(o.nodes, ",") // a Func flag prints nothing
	return o, nil
}

// configEntry is one key of the config file, its values as flag strings
// (a list gives several).
type configEntry struct {
	key    string
	values []string
	line   int
}

// readConfigFile reads a YAML mapping of flag names to values. A key that
// is no flag is an error naming it, so a typo never passes silently.
func readConfigFile(path string, fs *flag.FlagSet) ([]configEntry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return nil, nil // empty file: all defaults
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config file %s: line %d: want a mapping of settings (key: value)", path, root.Line)
	}
	var entries []configEntry
	seen := map[string]bool{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		key := k.Value
		switch {
		case key == "cookie":
			return nil, fmt.Errorf("config file %s: line %d: cookie: %w", path, k.Line, errSecretSetting)
		case key == "config" || fs.Lookup(key) == nil:
			return nil, fmt.Errorf("config file %s: line %d: unknown key %q (keys are the flag names; see megaphone --help)", path, k.Line, key)
		case seen[key]:
			return nil, fmt.Errorf("config file %s: line %d: %s given twice", path, k.Line, key)
		}
		seen[key] = true
		e := configEntry{key: key, line: k.Line}
		switch v.Kind {
		case yaml.ScalarNode:
			e.values = []string{scalarValue(v)}
		case yaml.SequenceNode:
			var items []string
			for _, item := range v.Content {
				if item.Kind != yaml.ScalarNode {
					return nil, fmt.Errorf("config file %s: line %d: %s: a list of plain values is expected", path, item.Line, key)
				}
				items = append(items, scalarValue(item))
			}
			// A list is its items comma-separated, as --node and
			// --bosh-paths read them.
			e.values = []string{strings.Join(items, ",")}
		default:
			return nil, fmt.Errorf("config file %s: line %d: %s: a value or a list of values is expected", path, v.Line, key)
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// scalarValue is a YAML scalar as a flag reads it; `key:` with no value
// (null) is the empty string, which turns a listener off.
func scalarValue(n *yaml.Node) string {
	if n.Tag == "!!null" {
		return ""
	}
	return n.Value
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// usage prints every flag with its default, and where settings come from.
func usage(w io.Writer) {
	var o options
	fs := newFlagSet(&o)
	fmt.Fprintf(w, `Usage: megaphone [flags]
       megaphone version

Megaphone's sidecar: attaches to a running ejabberd node as a hidden Erlang
node, owns the client sockets (BOSH, XMPP over TCP/TLS, WebSocket) and feeds
them to the Megaphone shim loaded in ejabberd.

Every flag can also be set in a YAML config file (--config FILE or
%s=FILE), under a key named like the flag (node: [ejabberd@localhost],
bosh-addr: 0.0.0.0:5280, shutdown-grace: 30s), or in the environment as
MEGAPHONE_<FLAG> (MEGAPHONE_BOSH_ADDR=0.0.0.0:5280). Precedence: flags, then
the environment, then the file, then the defaults. SIGHUP re-reads them all
and applies the limits, the log level and the TLS certificates; other
changes need a restart. SIGTERM drains, then exits.

Flags:
`, configEnv)
	fs.VisitAll(func(f *flag.Flag) {
		name, help := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  --%s %s\n      %s\n", f.Name, name, help)
		def := f.DefValue
		switch {
		case f.Name == "node":
			def = "none"
		case def == "":
			def = `""`
		}
		fmt.Fprintf(w, "      default: %s   env: %s\n", def, envName(f.Name))
	})
}
