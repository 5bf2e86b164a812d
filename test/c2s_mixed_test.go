package test

import (
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// A BOSH user and an XMPP user chat through the same sidecar: alice is
// Strophe.js over BOSH, bob @xmpp/client over STARTTLS, direct TLS or
// WebSocket; 1,000 messages each way, in order.
func TestBOSHUserChatsWithStreamUser(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej)
	for _, tc := range []struct {
		name, service string
		args          []string
	}{
		{"starttls", "xmpp://" + sc.c2s, []string{"--starttls", "required"}},
		{"direct-tls", "xmpps://" + sc.c2sTLS, nil},
		{"websocket", sc.wsURL(), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := startNodeClient(t, append([]string{"mixed_chat.mjs", "--bosh-url", sc.url(), "--service", tc.service,
				"--domain", "localhost", "--a", "alice", "--b", "bob", "--password", demoPassword, "--insecure",
				"--count", "1000", "--timeout", "120"}, tc.args...)...).wait(t, 3*time.Minute)
			if res.Received["a"] != 1000 || res.Received["b"] != 1000 {
				t.Errorf("received %v", res.Received)
			}
		})
	}
}

// Stream Management (XEP-0198) through the sidecar: a client whose
// connection drops abruptly reconnects on a new socket and resumes its
// session; nothing sent meanwhile is lost or duplicated. ejabberd does the
// resumption; the sidecar must only not break it.
func TestStreamManagementResumesThroughSidecar(t *testing.T) {
	ej := startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej)
	for _, tc := range []struct{ name, service, side string }{
		{"receiver-starttls", "xmpp://" + sc.c2s, "b"},
		{"sender-direct-tls", "xmpps://" + sc.c2sTLS, "a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := xmppChat(t, tc.service, "--mode", "live", "--duration", "8", "--interval-ms", "100",
				"--drop-at", "3", "--drop-side", tc.side, "--timeout", "90")
			var res struct {
				clientResult
				Resumed *bool `json:"resumed"`
			}
			if !c.finished(t, 2*time.Minute, &res) {
				t.Fatal("client did not finish")
			}
			if !res.OK || res.Resumed == nil || !*res.Resumed {
				t.Fatalf("not resumed cleanly: %+v\n%s", res, tail(c.stderr.String(), 40))
			}
		})
	}
}
