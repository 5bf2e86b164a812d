package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// BOSHWait is the wait attribute of every BOSH session: how long the
// server holds an idle session's long-poll before answering it empty. It
// is longer than any idle phase of the benchmark, so an idle session is
// exactly one held request.
const BOSHWait = 300

const httpbindNS = "http://jabber.org/protocol/httpbind"

var sidAttr = regexp.MustCompile(`sid=['"]([^'"]+)['"]`)

// boshSession is one BOSH session on one keep-alive HTTP/1.1 connection,
// hold=1: requests go one after another, and the idle session's one
// request stays held by the server.
type boshSession struct {
	t    Target
	d    *Dialer
	conn net.Conn
	br   *bufio.Reader
	sid  string
	rid  int64
}

func loginBOSH(ctx context.Context, d *Dialer, t Target, user, password string) (Session, error) {
	c, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, err
	}
	b := &boshSession{t: t, d: d, conn: c, br: bufio.NewReaderSize(c, 2048), rid: 1 + rand.Int64N(1<<40)}
	_ = c.SetDeadline(time.Now().Add(5 * stepTimeout))
	fail := func(err error) (Session, error) {
		c.Close()
		return nil, fmt.Errorf("%s: %w", user, err)
	}
	create := fmt.Sprintf("<body content='text/xml; charset=utf-8' hold='1' rid='%d' to='%s' ver='1.6' wait='%d' xml:lang='en'"+
		" xmpp:version='1.0' xmlns='%s' xmlns:xmpp='urn:xmpp:xbosh'/>", b.rid, t.Domain, BOSHWait, httpbindNS)
	resp, err := b.roundTrip(create)
	if err != nil {
		return fail(err)
	}
	m := sidAttr.FindStringSubmatch(resp)
	if m == nil {
		return fail(fmt.Errorf("no sid in %q", resp))
	}
	b.sid = m[1]
	if err := b.until(resp, "features>"); err != nil {
		return fail(err)
	}
	restart := fmt.Sprintf(" to='%s' xml:lang='en' xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh'", t.Domain)
	steps := []struct{ attrs, payload, until string }{
		{"", saslPlain(user, password), "<success"},
		{restart, "", "features>"},
		{"", bindRequest, "</iq>"},
		{"", "<presence/>", "<presence"},
	}
	for _, st := range steps {
		resp, err := b.roundTrip(b.body(st.attrs, st.payload))
		if err != nil {
			return fail(err)
		}
		if err := b.until(resp, st.until); err != nil {
			return fail(err)
		}
	}
	// The session now idles as a browser's would: one empty request held
	// by the server until something arrives or BOSHWait passes.
	if err := b.post(b.body("", "")); err != nil {
		return fail(err)
	}
	_ = c.SetDeadline(time.Time{})
	return b, nil
}

// until polls with empty requests until what the server sent contains want.
func (b *boshSession) until(seen, want string) error {
	for i := 0; !strings.Contains(seen, want); i++ {
		if i == 10 {
			return fmt.Errorf("no %s after %d polls (got %q)", want, i, seen)
		}
		resp, err := b.roundTrip(b.body("", ""))
		if err != nil {
			return err
		}
		seen += resp
	}
	return nil
}

func (b *boshSession) body(attrs, payload string) string {
	b.rid++
	open := fmt.Sprintf("<body rid='%d' sid='%s' xmlns='%s'%s", b.rid, b.sid, httpbindNS, attrs)
	if payload == "" {
		return open + "/>"
	}
	return open + ">" + payload + "</body>"
}

func (b *boshSession) post(body string) error {
	req := "POST " + b.t.Path + " HTTP/1.1\r\nHost: " + b.t.Addr + "\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
	_, err := io.WriteString(b.conn, req)
	return err
}

func (b *boshSession) roundTrip(body string) (string, error) {
	if err := b.post(body); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(b.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	text, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %s: %q", resp.Status, text)
	}
	terminated := strings.Contains(string(text), "type='terminate'") || strings.Contains(string(text), `type="terminate"`)
	if terminated && !strings.Contains(body, "type='terminate'") {
		return "", fmt.Errorf("session terminated: %q", text)
	}
	return string(text), nil
}

// Send is not offered: the benchmark chats over the stream transports.
func (b *boshSession) Send(string) error               { return ErrNoChat }
func (b *boshSession) Receive(func(body string)) error { return ErrNoChat }

// Close logs out as a browser client does: a terminate request on a
// second connection (the first one's request is held), which also ends the
// held request.
func (b *boshSession) Close() error {
	defer b.conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
	defer cancel()
	c, err := b.d.DialContext(ctx, "tcp", b.t.Addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(stepTimeout))
	end := &boshSession{t: b.t, conn: c, br: bufio.NewReaderSize(c, 1024), sid: b.sid, rid: b.rid}
	_, err = end.roundTrip(end.body(" type='terminate'", "<presence type='unavailable'/>"))
	return err
}
