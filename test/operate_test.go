package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/test/harness"
)

// shell runs operator commands in a real remote shell on the node (what
// `ejabberdctl debug` opens) and returns the transcript, logged for the
// reader: it is the README's real output.
func shell(t *testing.T, ej *harness.Ejabberd, commands ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := ej.Shell(ctx, commands...)
	t.Logf("shell:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// mustContain fails for each wanted piece the transcript lacks.
func mustContain(t *testing.T, what, transcript string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(transcript, w) {
			t.Errorf("%s: want %q in the output", what, w)
		}
	}
}

// readUntilClosed reads a connection until the peer closes it (bounded by
// limit) and returns what came.
func readUntilClosed(c net.Conn, limit time.Duration) string {
	_ = c.SetReadDeadline(time.Now().Add(limit))
	b, _ := io.ReadAll(c)
	return string(b)
}

// openWebSocket opens an XMPP WebSocket stream that never logs in.
func openWebSocket(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(url, http.Header{"Sec-WebSocket-Protocol": {"xmpp"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, []byte(`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>`)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // <open/> and <stream:features/>
		if _, _, err := ws.ReadMessage(); err != nil {
			t.Fatal(err)
		}
	}
	return ws
}

// boshSessionRequest is a BOSH session creation request as raw HTTP. Its
// wait is short: ejabberd (natively too) answers a session creation from
// an address that already has sessions only when wait runs out.
func boshSessionRequest(addr string) string {
	body := `<body xmlns='http://jabber.org/protocol/httpbind' rid='1000' to='localhost' wait='2' hold='1' ver='1.6' xml:lang='en'/>`
	return fmt.Sprintf("POST /bosh HTTP/1.1\r\nHost: %s\r\nContent-Type: text/xml\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		addr, len(body), body)
}

// Every command of the operator's shell API, typed into a real remote
// shell against a real node with real clients attached, and checked from
// the clients' side: status, connections (with filters), info, kick by JID
// and by id, limits pushed live, drain and resume, and stop that unloads.
func TestShellCommands(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, u := range []string{"carol", "dave"} {
		if err := ej.Register(ctx, u, "localhost", demoPassword); err != nil {
			t.Fatal(err)
		}
	}
	sc := startStreamSidecar(t, ej)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sidecar log:\n%s", tail(sc.logs(), 80))
		}
	})
	chat := startClient(t, sc.url(), "--mode", "live", "--duration", "25", "--interval-ms", "250", "--timeout", "120")
	chat.waitReady(t)
	carol := rawLogin(t, sc.c2sTLS, "carol")
	defer carol.Close()
	ws := openWebSocket(t, sc.wsURL())

	out := shell(t, ej,
		`megaphone:status().`,
		`[maps:get(transport, C) || C <- megaphone:connections(#{jid => "carol@localhost"})].`,
		`[#{id := CarolId}] = megaphone:connections(#{jid => <<"carol@localhost">>}).`,
		`{ok, #{jid := CarolJid, c2s := CarolC2S}} = megaphone:info(CarolId).`,
		`CarolJid.`,
		`is_process_alive(CarolC2S).`,
		`length(megaphone:connections(#{transport => bosh})) > 0.`,
		`[J || #{jid := J} <- megaphone:connections(#{transport => websocket})].`,
		`megaphone:connections(#{transport => pigeon}).`,
		`megaphone:info(999999999).`)
	mustContain(t, "status, connections and info", out,
		"running => true", "draining => false", "tls => 1", "websocket => 1",
		"[tls]", `<<"carol@localhost/`, "true", "[undefined]",
		"{error,{bad_filter,{transport,pigeon}}}", "{error,not_found}")

	// Kick by JID: ejabberd ends carol's session itself; her client sees
	// the stream error.
	out = shell(t, ej, `megaphone:kick(<<"carol@localhost">>).`)
	mustContain(t, "kick by JID", out, "{ok,1}")
	if got := readUntilClosed(carol, 15*time.Second); !strings.Contains(got, "policy-violation") {
		t.Errorf("carol was kicked but saw %q", got)
	}
	// Kick by id: a stream that never logged in is ended by the sidecar.
	out = shell(t, ej, `[#{id := WsId}] = megaphone:connections(#{transport => websocket}).`, `megaphone:kick(WsId).`)
	mustContain(t, "kick by id", out, "{ok,1}")
	_, msg, _ := ws.ReadMessage()
	if !strings.Contains(string(msg), "policy-violation") {
		t.Errorf("the WebSocket stream was kicked but saw %q", msg)
	}

	// Limits, pushed live: a stanza over the new limit ends dave's stream.
	out = shell(t, ej,
		`megaphone:limits(#{max_stanza_bytes => 4096, max_conns_per_ip => 1000}).`,
		`megaphone:limits(#{max_connz => 1}).`)
	mustContain(t, "limits", out, "max_stanza_bytes => 4096", "max_conns_per_ip => 1000",
		"{error,{bad_limits,#{max_connz => 1}}}")
	dave := rawLogin(t, sc.c2sTLS, "dave")
	if _, err := io.WriteString(dave, "<message to='bob@localhost' type='chat'><body>"+strings.Repeat("x", 5000)+"</body></message>"); err != nil {
		t.Fatal(err)
	}
	if got := readUntilClosed(dave, 15*time.Second); !strings.Contains(got, "policy-violation") {
		t.Errorf("a stanza over the operator's limit got %q", got)
	}
	dave.Close()

	// Drain: no new stream connection, no new BOSH session; the sessions
	// already open (the live chat) carry on.
	out = shell(t, ej, `megaphone:drain().`, `[maps:get(draining, S) || S <- maps:get(sidecars, megaphone:status())].`)
	mustContain(t, "drain", out, "open =>", "[true]")
	if c, err := net.DialTimeout("tcp", sc.c2sTLS, 5*time.Second); err == nil {
		if got := readUntilClosed(c, 5*time.Second); got != "" {
			t.Errorf("a new connection while draining got %q", got)
		}
		c.Close()
	}
	if got := rawHTTP(t, sc.addr, boshSessionRequest(sc.addr)); !strings.Contains(got, "system-shutdown") {
		t.Errorf("a new BOSH session while draining got %q", got)
	}
	// Resume: new logins work again.
	out = shell(t, ej, `megaphone:resume().`)
	mustContain(t, "resume", out, "open =>")
	rawLogin(t, sc.c2sTLS, "dave").Close()
	if got := rawHTTP(t, sc.addr, boshSessionRequest(sc.addr)); !strings.Contains(got, "sid=") {
		t.Errorf("a new BOSH session after resume got %q", got)
	}

	if res := chat.wait(t, 3*time.Minute); !res.OK {
		t.Errorf("the BOSH chat across drain and resume: %+v", res)
	}

	// Stop unloads the shim; the sidecar keeps its listeners and attaches
	// again once the operator starts it.
	out = shell(t, ej, `megaphone:stop().`, `whereis(megaphone_listener).`, `code:is_loaded(megaphone_sidecar).`)
	mustContain(t, "stop", out, "ok", "undefined", "false")
	waitUntil(t, 20*time.Second, "the sidecar notices the shim is gone", func() bool {
		return strings.Contains(sc.logs(), "detached from the shim") || strings.Contains(sc.logs(), "cannot attach")
	})
	attachments := strings.Count(sc.logs(), "attached to the shim")
	shell(t, ej, `megaphone:start().`)
	waitUntil(t, 30*time.Second, "the sidecar attaches again", func() bool {
		return strings.Count(sc.logs(), "attached to the shim") > attachments
	})
	rawLogin(t, sc.c2sTLS, "dave").Close()
}

// The shim as an ejabberd module: with its ebin on the code path at boot
// (ERL_OPTIONS in /etc/default/ejabberd) and mod_megaphone in the config,
// it starts with ejabberd, once for two virtual hosts, validates its
// options, follows reload_config, and serves a sidecar.
func TestModMegaphone(t *testing.T) {
	extra := "modules:\n  mod_megaphone:\n    gc_sweep_interval: 5\n    login_gc_interval: 300\n    send_busy_timeout: 700\n" +
		"    allowed_sidecars: [\"megaphone_e2e_*@localhost\"]\n"
	ej := harness.MustStart(t, hostTarget.Options(harness.Options{Name: "modmeg",
		Hosts: []string{"localhost", "example.test"}, CodePaths: []string{shimEbin}, ExtraConfig: extra}))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, u := range []string{"alice", "bob"} {
		if err := ej.Register(ctx, u, "localhost", demoPassword); err != nil {
			t.Fatal(err)
		}
	}
	if got := eval(t, ej, `{application:get_env(megaphone, gc_sweep_interval), application:get_env(megaphone, send_busy_timeout),
	    application:get_env(megaphone, allowed_sidecars), application:get_env(megaphone, login_gc_interval),
	    is_pid(whereis(megaphone_listener)), length([H || H <- ejabberd_option:hosts(), gen_mod:is_loaded(H, mod_megaphone)])}`); got != `{{ok,5000},{ok,700},{ok,[<<"megaphone_e2e_*@localhost">>]},{ok,300},true,2}` {
		t.Fatalf("mod_megaphone at boot: %s", got)
	}
	sc := startSidecar(t, ej, "")
	if res := startClient(t, sc.url(), "--count", "50").wait(t, 2*time.Minute); !res.OK {
		t.Fatalf("BOSH chat through mod_megaphone: %+v", res)
	}

	extraFile := filepath.Join(ej.Dir, "extra.yml")
	reload := func(config string) string {
		if err := os.WriteFile(extraFile, []byte(config), 0o644); err != nil {
			t.Fatal(err)
		}
		return eval(t, ej, `ejabberd_admin:reload_config()`)
	}
	// A bad option is refused with ejabberd's own validation message, and
	// the running shim is left alone.
	if got := reload("modules:\n  mod_megaphone:\n    gc_sweep_interval: -1\n"); !strings.Contains(got, "gc_sweep_interval") {
		t.Errorf("reload with a bad option: %s", got)
	}
	if got := eval(t, ej, `is_pid(whereis(megaphone_listener))`); got != "true" {
		t.Errorf("a refused reload stopped the shim")
	}
	// New options apply on reload.
	if got := reload("modules:\n  mod_megaphone:\n    gc_sweep_interval: 9\n"); !strings.HasPrefix(got, "ok") {
		t.Fatalf("reload: %s", got)
	}
	if got := eval(t, ej, `application:get_env(megaphone, gc_sweep_interval)`); got != "{ok,9000}" {
		t.Errorf("after reload: %s", got)
	}
	// Taken out of the config, the shim stops (once, after the last host).
	if got := reload("{}\n"); !strings.HasPrefix(got, "ok") {
		t.Fatalf("reload: %s", got)
	}
	waitUntil(t, 10*time.Second, "the shim stops once mod_megaphone is gone", func() bool {
		return eval(t, ej, `whereis(megaphone_listener)`) == "undefined"
	})
	waitUntil(t, 20*time.Second, "the sidecar notices the shim is gone", func() bool {
		return strings.Contains(sc.logs(), "detached from the shim")
	})
}

// ejabberd stopped for 10 s under 200 BOSH clients, then started again:
// the sidecar never exits, every client gets a terminate or an error and
// none hangs, a request while ejabberd is down gets a proper terminate,
// the sidecar logs the outage without a storm, and once ejabberd is back
// (the shim starts with it, as mod_megaphone) new logins succeed.
func TestEjabberdRestartUnderBOSHLoad(t *testing.T) {
	const users = 200
	opts := harness.Options{Name: "restart", KeepDir: true, CodePaths: []string{shimEbin},
		ExtraConfig: "modules:\n  mod_megaphone: {}\n"}
	ej := harness.MustStart(t, hostTarget.Options(opts))
	t.Cleanup(func() { os.RemoveAll(ej.Dir) })
	eval(t, ej, fmt.Sprintf(`[ejabberd_auth:try_register(<<"user", (integer_to_binary(I))/binary>>,
	    <<"localhost">>, <<%q>>) || I <- lists:seq(1, %d)], ok`, demoPassword, users))
	sc := startSidecar(t, ej, "")
	swarm := startSwarm(t, sc.url(), "--users", fmt.Sprint(users), "--duration", "20", "--interval-ms", "1000",
		"--concurrency", "20", "--timeout", "240")
	if got := swarm.waitReady(t); got["logged_in"] != users {
		t.Fatalf("logged in %v of %d", got["logged_in"], users)
	}
	time.Sleep(2 * time.Second)
	if err := ej.Stop(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	res := swarm.wait(t, 3*time.Minute)
	t.Logf("after stopping ejabberd: %+v", res)
	// ejabberd stopping on purpose ends its c2s processes with a stream
	// error (remote-stream-error for BOSH clients); whatever it had no time
	// to answer gets remote-connection-failed from the sidecar.
	terminated := 0
	for _, n := range res.Terminated {
		terminated += n
	}
	if res.Hung != 0 || res.Alive != 0 || terminated != users || res.OutOfOrder != 0 {
		t.Errorf("want all %d sessions terminated, none hung; got %+v", users, res)
	}
	if got := rawHTTP(t, sc.addr, boshSessionRequest(sc.addr)); !strings.Contains(got, "remote-connection-failed") {
		t.Errorf("a new session while ejabberd is down got %q", got)
	}
	time.Sleep(time.Until(down.Add(10 * time.Second)))
	select {
	case <-sc.exited:
		t.Fatalf("the sidecar exited while ejabberd was down:\n%s", tail(sc.logs(), 20))
	default:
	}

	attachments := strings.Count(sc.logs(), "attached to the shim")
	opts.Dir = ej.Dir // same node name and spool: the users are still there
	back, err := harness.Start(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = back.Stop() })
	waitUntil(t, 30*time.Second, "the sidecar re-attaches", func() bool {
		return strings.Count(sc.logs(), "attached to the shim") > attachments
	})
	again := startSwarm(t, sc.url(), "--users", "20", "--duration", "3", "--interval-ms", "500",
		"--concurrency", "10", "--timeout", "120")
	if got := again.waitReady(t); got["logged_in"] != 20 {
		t.Errorf("after the restart, logged in %v of 20", got["logged_in"])
	}
	if res := again.wait(t, 2*time.Minute); !res.OK {
		t.Errorf("after the restart: %+v", res)
	}
	// One line per distinct failure, not one per retry or per request.
	outage := regexp.MustCompile(`cannot attach to the shim`).FindAllString(sc.logs(), -1)
	if len(outage) > 5 {
		t.Errorf("%d 'cannot attach' lines for one outage: a log storm\n%s", len(outage), tail(sc.logs(), 30))
	}
}
