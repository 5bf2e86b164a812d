package loadgen

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// framer carries XMPP text over one connection: raw bytes over TCP/TLS, one
// stanza per message over WebSocket.
type framer interface {
	write(text string) error
	read() (string, error)
	setDeadline(t time.Time)
	close() error
	// header opens (or, after authentication, restarts) the stream.
	header(domain string) string
}

type rawFramer struct {
	conn net.Conn
	buf  []byte // allocated while reading: an idle session holds none
}

func (f *rawFramer) write(text string) error {
	_, err := f.conn.Write([]byte(text))
	return err
}

func (f *rawFramer) read() (string, error) {
	if f.buf == nil {
		f.buf = make([]byte, 4096)
	}
	n, err := f.conn.Read(f.buf)
	return string(f.buf[:n]), err
}

func (f *rawFramer) setDeadline(t time.Time) { _ = f.conn.SetDeadline(t) }
func (f *rawFramer) close() error            { return f.conn.Close() }
func (f *rawFramer) header(domain string) string {
	return "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='" +
		domain + "' version='1.0'>"
}

type wsFramer struct{ conn *websocket.Conn }

func dialWebSocket(ctx context.Context, d *Dialer, t Target) (*wsFramer, error) {
	wd := websocket.Dialer{
		NetDialContext:   d.DialContext,
		HandshakeTimeout: stepTimeout,
		Subprotocols:     []string{"xmpp"},
		// Small buffers: the client's memory is not what we measure, but
		// the load generator must still fit next to 20,000 sessions.
		ReadBufferSize:  2048,
		WriteBufferSize: 2048,
	}
	c, resp, err := wd.DialContext(ctx, "ws://"+t.Addr+t.Path, http.Header{})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("websocket %s: %s: %w", t.Addr, resp.Status, err)
		}
		return nil, err
	}
	return &wsFramer{conn: c}, nil
}

func (f *wsFramer) write(text string) error {
	return f.conn.WriteMessage(websocket.TextMessage, []byte(text))
}

func (f *wsFramer) read() (string, error) {
	_, b, err := f.conn.ReadMessage()
	return string(b), err
}

func (f *wsFramer) setDeadline(t time.Time) {
	_ = f.conn.SetReadDeadline(t)
	_ = f.conn.SetWriteDeadline(t)
}
func (f *wsFramer) close() error { return f.conn.Close() }
func (f *wsFramer) header(domain string) string {
	return "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='" + domain + "' version='1.0'/>"
}

// stream is a logged-in XMPP stream session (TCP, TLS or WebSocket).
type stream struct{ f framer }

func loginStream(f framer, t Target, user, password string) (Session, error) {
	domain := t.Domain
	timeout := t.Timeout
	if timeout <= 0 {
		timeout = 5 * stepTimeout
	}
	f.setDeadline(time.Now().Add(timeout))
	steps := []struct{ send, until string }{
		{f.header(domain), "features>"},
		{saslPlain(user, password), "<success"},
		{f.header(domain), "features>"},
		{bindRequest, "</iq>"},
		{"<presence/>", "<presence"},
	}
	for _, st := range steps {
		if err := f.write(st.send); err != nil {
			f.close()
			return nil, err
		}
		var seen strings.Builder
		for !strings.Contains(seen.String(), st.until) {
			text, err := f.read()
			seen.WriteString(text)
			if err != nil {
				f.close()
				return nil, fmt.Errorf("%s: waiting for %s: %w (got %q)", user, st.until, err, seen.String())
			}
		}
	}
	f.setDeadline(time.Time{})
	if r, ok := f.(*rawFramer); ok {
		r.buf = nil // an idle session keeps only its socket; Receive allocates again
	}
	return &stream{f: f}, nil
}

func (s *stream) Send(stanza string) error { return s.f.write(stanza) }
func (s *stream) Close() error             { return s.f.close() }

func (s *stream) Receive(fn func(body string)) error {
	rest := ""
	for {
		text, err := s.f.read()
		if err != nil {
			return err
		}
		rest = bodies(rest+text, fn)
	}
}
