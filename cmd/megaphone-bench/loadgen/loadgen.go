// Package loadgen is megaphone-bench's load generator: a small XMPP client
// that logs in over plain TCP, direct TLS, WebSocket (RFC 7395) or BOSH
// (XEP-0124/0206) exactly as a real client would (SASL PLAIN, resource
// binding, initial presence), then sits idle or chats. It spreads its
// connections over several loopback source addresses so that one run can
// open more connections than one source address has ephemeral ports.
package loadgen

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"
)

// Kind is a client transport.
type Kind string

const (
	TCP       Kind = "tcp"  // XMPP over plain TCP
	TLS       Kind = "tls"  // XMPP over direct TLS (XEP-0368)
	WebSocket Kind = "ws"   // XMPP over WebSocket (RFC 7395)
	BOSH      Kind = "bosh" // XMPP over BOSH (XEP-0124/0206)
)

// Target is where and how a session logs in.
type Target struct {
	Kind   Kind
	Addr   string // host:port
	Path   string // URL path for WebSocket and BOSH
	Domain string // XMPP domain, e.g. localhost
	// Timeout bounds a stream login from the stream header to the
	// presence (0: five steps' worth). A short one finds a server that
	// stopped answering (connections left in its backlog) sooner.
	Timeout time.Duration
}

// Session is one logged-in client.
type Session interface {
	// Send writes one stanza.
	Send(stanza string) error
	// Receive calls fn with the text of every <body/> the session receives,
	// until the session is closed or fails.
	Receive(fn func(body string)) error
	Close() error
}

// ErrNoChat: the transport's client only logs in and idles.
var ErrNoChat = errors.New("loadgen: this transport does not chat")

// stepTimeout bounds each login step; a login has five.
const stepTimeout = 30 * time.Second

// Dialer opens TCP connections from a rotating set of loopback source
// addresses (127.0.0.2, 127.0.0.3, ...): each source address has its own
// ephemeral port range towards one listener.
type Dialer struct {
	sources []net.IP
	next    atomic.Uint64
}

// NewDialer spreads connections over sources loopback addresses.
func NewDialer(sources int) *Dialer {
	if sources < 1 {
		sources = 1
	}
	if sources > 250 {
		sources = 250
	}
	d := &Dialer{}
	for i := 0; i < sources; i++ {
		d.sources = append(d.sources, net.IPv4(127, 0, 0, byte(2+i)))
	}
	return d
}

// NewDialerFrom spreads connections over n loopback addresses from
// 127.0.0.first on: load generators running side by side each take their
// own, and with them their own ephemeral ports.
func NewDialerFrom(first, n int) *Dialer {
	n = max(1, min(n, 255-first))
	d := &Dialer{}
	for i := 0; i < n; i++ {
		d.sources = append(d.sources, net.IPv4(127, 0, 0, byte(first+i)))
	}
	return d
}

// DialContext dials addr over TCP from the next source address.
func (d *Dialer) DialContext(ctx context.Context, _, addr string) (net.Conn, error) {
	ip := d.sources[d.next.Add(1)%uint64(len(d.sources))]
	// No TCP keep-alive: the server's end probes already, and with both
	// ends of every connection on this box the probes of hundreds of
	// thousands of sockets flood loopback (BENCH.md, the scale run).
	nd := net.Dialer{Timeout: stepTimeout, LocalAddr: &net.TCPAddr{IP: ip}, KeepAlive: -1}
	return nd.DialContext(ctx, "tcp", addr)
}

// Login opens a session for user@t.Domain over t.
func Login(ctx context.Context, d *Dialer, t Target, user, password string) (Session, error) {
	switch t.Kind {
	case TCP, TLS:
		c, err := d.DialContext(ctx, "tcp", t.Addr)
		if err != nil {
			return nil, err
		}
		if t.Kind == TLS {
			tc := tls.Client(c, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true}) // our own self-signed certificate
			_ = tc.SetDeadline(time.Now().Add(stepTimeout))
			if err := tc.HandshakeContext(ctx); err != nil {
				c.Close()
				return nil, err
			}
			c = tc
		}
		return loginStream(&rawFramer{conn: c}, t, user, password)
	case WebSocket:
		f, err := dialWebSocket(ctx, d, t)
		if err != nil {
			return nil, err
		}
		return loginStream(f, t, user, password)
	case BOSH:
		return loginBOSH(ctx, d, t, user, password)
	}
	return nil, fmt.Errorf("loadgen: unknown transport %q", t.Kind)
}

func saslPlain(user, password string) string {
	return "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" +
		base64.StdEncoding.EncodeToString([]byte("\x00"+user+"\x00"+password)) + "</auth>"
}

const bindRequest = "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"

// ChatMessage is a one-to-one chat message carrying body as its text.
func ChatMessage(to, body string) string {
	return "<message to='" + to + "' type='chat'><body>" + body + "</body></message>"
}

// bodies extracts the text of every complete <body>…</body> in text and
// returns what is left to be completed by later reads.
func bodies(text string, fn func(string)) string {
	for {
		i := strings.Index(text, "<body>")
		if i < 0 {
			if len(text) > len("<body>") {
				text = text[len(text)-len("<body>"):]
			}
			return text
		}
		j := strings.Index(text[i:], "</body>")
		if j < 0 {
			return text[i:]
		}
		fn(text[i+len("<body>") : i+j])
		text = text[i+j+len("</body>"):]
	}
}
