package loadgen

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// BOSHWait is the wait attribute of every BOSH session: how long the
// server holds an idle session's long-poll before answering it empty. It
// is longer than any idle phase of the benchmark, so an idle session is
// exactly one held request.
const BOSHWait = 300

const httpbindNS = "http://jabber.org/protocol/httpbind"

var (
	sidAttr       = regexp.MustCompile(`\ssid=['"]([^'"]+)['"]`)
	typeAttr      = regexp.MustCompile(`\stype=['"]([^'"]+)['"]`)
	conditionAttr = regexp.MustCompile(`\scondition=['"]([^'"]+)['"]`)
)

// heldReadTimeout bounds the wait for the answer to a request: the server
// holds one for up to BOSHWait, and answers it a moment later.
const heldReadTimeout = BOSHWait*time.Second + stepTimeout

// inboxSize is how many answers with stanzas in them may wait for Receive.
// A full inbox holds up the connection's reader (as a full socket buffer
// holds up a stream's server), for at most stepTimeout.
const inboxSize = 8

// pollLanding is how long a request waits before it goes out on one
// connection while an empty poll posted on the other one so short a time
// ago may still be on its way. Overtaken, the poll would reach the server
// after a higher rid, and ejabberd_bosh parks that higher rid until the
// poll is answered with something, which may be never (docs/ARCHITECTURE.md,
// "Why a session's requests are kept in rid order"). It matters after the
// login (its poll, then at once the first stanza) and when a receiver logs
// out right after a delivery; a stanza after a stanza goes out once the
// server answered the older request, so the earlier stanza is there.
const pollLanding = 100 * time.Millisecond

// errClosed is what Send says once the session is closing.
var errClosed = errors.New("loadgen: BOSH session closed")

// boshSession is one BOSH session with hold=1, kept as a browser client
// (Strophe.js) keeps it: the server always holds one request of it; a
// stanza goes out on the other keep-alive connection, so at most two
// requests are out at once (the server then answers the older one); an
// answer that leaves no request out is followed at once by an empty poll.
//
// It logs in and idles on one connection with no goroutine of its own: an
// idle session is its socket and the one request the server holds, and
// what the benchmark measures of it does not depend on the client. The
// second connection is dialled at the first Send, and a reader goroutine
// per connection runs from the first Send or Receive until Close.
type boshSession struct {
	t   Target
	d   *Dialer
	sid string

	mu       sync.Mutex
	rid      int64        // the last rid sent; requests go out in rid order, under mu
	conns    [2]*boshConn // [0] logged in; [1] dialled at the first Send
	chatting bool         // the readers run
	closing  bool         // Close has begun: no more polls or stanzas
	closeRID int64        // the terminate's rid
	ended    bool         // done is closed
	err      error        // why the session ended, if not by Close

	done    chan struct{} // closed when the session ends (Close or a failure)
	freed   chan struct{} // a connection has no request out any more (wakes Send, Close)
	inbox   chan string   // answers carrying stanzas, for Receive
	readers sync.WaitGroup
}

// boshConn is one of a session's keep-alive connections: one request at a
// time, no pipelining.
type boshConn struct {
	conn   net.Conn
	br     *bufio.Reader
	out    int64         // the rid of the request out on it, 0: none
	pollAt time.Time     // when the last empty poll went out on it
	posted chan struct{} // a request went out: its reader reads the answer
}

func newBOSHConn(c net.Conn, bufSize int) *boshConn {
	return &boshConn{conn: c, br: bufio.NewReaderSize(c, bufSize), posted: make(chan struct{}, 1)}
}

func loginBOSH(ctx context.Context, d *Dialer, t Target, user, password string) (Session, error) {
	c, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, err
	}
	b := &boshSession{t: t, d: d, rid: 1 + rand.Int64N(1<<40),
		done: make(chan struct{}), freed: make(chan struct{}, 1), inbox: make(chan string, inboxSize)}
	b.conns[0] = newBOSHConn(c, 2048)
	_ = c.SetDeadline(time.Now().Add(5 * stepTimeout))
	fail := func(err error) (Session, error) {
		c.Close()
		return nil, fmt.Errorf("%s: %w", user, err)
	}
	create := fmt.Sprintf("<body content='text/xml; charset=utf-8' hold='1' rid='%d' to='%s' ver='1.6' wait='%d' xml:lang='en'"+
		" xmpp:version='1.0' xmlns='%s' xmlns:xmpp='urn:xmpp:xbosh'/>", b.rid, t.Domain, BOSHWait, httpbindNS)
	resp, err := b.roundTrip(b.conns[0], create)
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
		resp, err := b.roundTrip(b.conns[0], b.body(st.attrs, st.payload))
		if err != nil {
			return fail(err)
		}
		if err := b.until(resp, st.until); err != nil {
			return fail(err)
		}
	}
	// The session now idles as a browser's would: one empty request held
	// by the server until something arrives or BOSHWait passes.
	if err := post(b.conns[0], b.t, b.body("", "")); err != nil {
		return fail(err)
	}
	b.conns[0].out, b.conns[0].pollAt = b.rid, time.Now()
	_ = c.SetDeadline(time.Time{})
	return b, nil
}

// until polls with empty requests until what the server sent contains want.
func (b *boshSession) until(seen, want string) error {
	for i := 0; !strings.Contains(seen, want); i++ {
		if i == 10 {
			return fmt.Errorf("no %s after %d polls (got %q)", want, i, seen)
		}
		resp, err := b.roundTrip(b.conns[0], b.body("", ""))
		if err != nil {
			return err
		}
		seen += resp
	}
	return nil
}

// body wraps payload in the session's next request (the next rid).
func (b *boshSession) body(attrs, payload string) string {
	b.rid++
	open := fmt.Sprintf("<body rid='%d' sid='%s' xmlns='%s'%s", b.rid, b.sid, httpbindNS, attrs)
	if payload == "" {
		return open + "/>"
	}
	return open + ">" + payload + "</body>"
}

func post(bc *boshConn, t Target, body string) error {
	req := "POST " + t.Path + " HTTP/1.1\r\nHost: " + t.Addr + "\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
	_, err := io.WriteString(bc.conn, req)
	return err
}

// readAnswer reads one HTTP response and returns its body; any status but
// 200 is an error.
func readAnswer(br *bufio.Reader) (string, error) {
	resp, err := http.ReadResponse(br, nil)
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
	return string(text), nil
}

// roundTrip posts body on bc and reads its answer: the login's lockstep.
func (b *boshSession) roundTrip(bc *boshConn, body string) (string, error) {
	if err := post(bc, b.t, body); err != nil {
		return "", err
	}
	text, err := readAnswer(bc.br)
	if err != nil {
		return "", err
	}
	reply, err := parseBOSHReply(text)
	if err != nil {
		return "", err
	}
	if reply.terminate && !strings.Contains(body, "type='terminate'") {
		return "", fmt.Errorf("session terminated: %q", text)
	}
	return text, nil
}

// boshReply is what one answer of the connection manager says.
type boshReply struct {
	terminate bool
	condition string // the terminate's condition, if any
	payload   string // the <body/>'s children: stanzas, or nothing
}

// parseBOSHReply reads the <body/> a connection manager answered with.
// Only its start tag's attributes count: a stanza inside may say anything.
func parseBOSHReply(text string) (boshReply, error) {
	var r boshReply
	start := strings.Index(text, "<body")
	if start < 0 {
		return r, fmt.Errorf("not a BOSH body: %q", clip(text))
	}
	tagLen := strings.IndexByte(text[start:], '>')
	if tagLen < 0 {
		return r, fmt.Errorf("unfinished body tag: %q", clip(text))
	}
	tag := text[start : start+tagLen]
	if !strings.HasSuffix(tag, "/") {
		rest := text[start+tagLen+1:]
		end := strings.LastIndex(rest, "</body>")
		if end < 0 {
			return r, fmt.Errorf("unfinished body: %q", clip(text))
		}
		r.payload = rest[:end]
	}
	if m := typeAttr.FindStringSubmatch(tag); m != nil && m[1] == "terminate" {
		r.terminate = true
		if m := conditionAttr.FindStringSubmatch(tag); m != nil {
			r.condition = m[1]
		}
	}
	return r, nil
}

func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}

// Send posts stanza with the next rid on a connection with no request out,
// waiting (at most stepTimeout) for one while both are.
func (b *boshSession) Send(stanza string) error {
	var deadline <-chan time.Time
	b.mu.Lock()
	defer b.mu.Unlock()
	b.startChatLocked()
	for {
		if b.closing {
			return errClosed
		}
		if b.ended {
			return b.err
		}
		bc, err := b.freeConnLocked()
		if err != nil {
			b.endLocked(err)
			return err
		}
		if bc != nil {
			if wait := b.pollLandingLocked(bc); wait > 0 {
				b.sleepLocked(wait)
				continue
			}
			return b.postLocked(bc, b.body("", stanza))
		}
		if deadline == nil {
			t := time.NewTimer(stepTimeout)
			defer t.Stop()
			deadline = t.C
		}
		if err := b.waitFreedLocked(deadline); err != nil {
			return err
		}
	}
}

// pollLandingLocked is how long a request on bc must wait for a poll on
// the other connection to land (pollLanding), 0 if it need not.
func (b *boshSession) pollLandingLocked(bc *boshConn) time.Duration {
	for _, other := range b.conns {
		if other != nil && other != bc && other.out != 0 {
			if wait := pollLanding - time.Since(other.pollAt); wait > 0 {
				return wait
			}
		}
	}
	return 0
}

// sleepLocked lets go of mu for d.
func (b *boshSession) sleepLocked(d time.Duration) {
	b.mu.Unlock()
	defer b.mu.Lock()
	time.Sleep(d)
}

// waitFreedLocked lets go of mu until a connection is freed, the session
// ends or deadline passes.
func (b *boshSession) waitFreedLocked(deadline <-chan time.Time) error {
	b.mu.Unlock()
	defer b.mu.Lock()
	select {
	case <-b.freed:
		return nil
	case <-b.done:
		return nil
	case <-deadline:
		return fmt.Errorf("loadgen: BOSH session %s: both requests still out after %v", b.sid, stepTimeout)
	}
}

// Receive calls fn with the text of every <body/> in the stanzas the
// server delivers, until Close (then nil) or until the session fails: an
// HTTP error, a terminate from the server or a broken connection. One
// Receive at a time.
func (b *boshSession) Receive(fn func(body string)) error {
	b.mu.Lock()
	b.startChatLocked()
	b.mu.Unlock()
	for {
		select {
		case payload := <-b.inbox:
			bodies(payload, fn)
		case <-b.done:
			for {
				select {
				case payload := <-b.inbox:
					bodies(payload, fn)
				default:
					b.mu.Lock()
					defer b.mu.Unlock()
					return b.err
				}
			}
		}
	}
}

// startChatLocked starts reading the answer to the request login left
// held, once: from here on the session keeps a request held itself.
func (b *boshSession) startChatLocked() {
	if b.chatting || b.closing || b.ended {
		return
	}
	b.chatting = true
	b.startReaderLocked(b.conns[0])
	if b.conns[0].out != 0 {
		b.conns[0].posted <- struct{}{}
	}
}

func (b *boshSession) startReaderLocked(bc *boshConn) {
	b.readers.Add(1)
	go b.read(bc)
}

// freeConnLocked is a connection with no request out, dialling the second
// one if it is needed and not open yet; nil if both have one out.
func (b *boshSession) freeConnLocked() (*boshConn, error) {
	for i, bc := range b.conns {
		if bc == nil {
			ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
			c, err := b.d.DialContext(ctx, "tcp", b.t.Addr)
			cancel()
			if err != nil {
				return nil, err
			}
			bc = newBOSHConn(c, 1024)
			b.conns[i] = bc
			if b.chatting {
				b.startReaderLocked(bc)
			}
			return bc, nil
		}
		if bc.out == 0 {
			return bc, nil
		}
	}
	return nil, nil
}

// postLocked sends body (built by b.body, so with the next rid) on bc and
// hands the answer to bc's reader.
func (b *boshSession) postLocked(bc *boshConn, body string) error {
	_ = bc.conn.SetWriteDeadline(time.Now().Add(stepTimeout))
	if err := post(bc, b.t, body); err != nil {
		err = fmt.Errorf("loadgen: BOSH session %s: %w", b.sid, err)
		b.endLocked(err)
		return err
	}
	bc.out = b.rid
	if b.chatting {
		select {
		case bc.posted <- struct{}{}:
		default:
		}
	}
	return nil
}

// read is bc's reader: it reads the answer to each request posted on bc,
// hands stanzas to Receive and keeps a request held. It ends with the
// session.
func (b *boshSession) read(bc *boshConn) {
	defer b.readers.Done()
	for {
		select {
		case <-bc.posted:
		case <-b.done:
			return
		}
		_ = bc.conn.SetReadDeadline(time.Now().Add(heldReadTimeout))
		text, err := readAnswer(bc.br)
		var reply boshReply
		if err == nil {
			reply, err = parseBOSHReply(text)
		}
		b.mu.Lock()
		rid := bc.out
		bc.out = 0
		switch {
		case b.closing && (err != nil || reply.terminate || rid == b.closeRID):
			// The terminate's answer, or the other request let go because
			// of it, or Close cutting the connection: the end Close wants.
			b.endLocked(nil)
		case err != nil:
			b.endLocked(fmt.Errorf("loadgen: BOSH session %s, rid %d: %w", b.sid, rid, err))
		case reply.terminate:
			b.endLocked(fmt.Errorf("loadgen: BOSH session %s terminated by the server (%s), rid %d", b.sid, reply.condition, rid))
		case !b.closing && b.conns[0].out == 0 && (b.conns[1] == nil || b.conns[1].out == 0):
			// Nothing left held: poll, so that the server can always answer.
			if b.postLocked(bc, b.body("", "")) == nil {
				bc.pollAt = time.Now()
			}
		default:
			select {
			case b.freed <- struct{}{}:
			default:
			}
		}
		ended := b.ended
		b.mu.Unlock()
		if ended {
			return
		}
		if strings.TrimSpace(reply.payload) != "" {
			b.deliver(reply.payload)
		}
	}
}

// deliver hands an answer's stanzas to Receive, waiting for it at most
// stepTimeout: a session whose stanzas nobody reads fails.
func (b *boshSession) deliver(payload string) {
	t := time.NewTimer(stepTimeout)
	defer t.Stop()
	select {
	case b.inbox <- payload:
	case <-b.done:
	case <-t.C:
		b.mu.Lock()
		b.endLocked(fmt.Errorf("loadgen: BOSH session %s: stanzas not received for %v", b.sid, stepTimeout))
		b.mu.Unlock()
	}
}

// endLocked ends the session once, with err (nil: closed).
func (b *boshSession) endLocked(err error) {
	if b.ended {
		return
	}
	b.ended, b.err = true, err
	close(b.done)
}

// Close logs out as a browser client does: a terminate request (with an
// unavailable presence) on the connection that has no request out, the
// second one for a session that only idled; the server answers the held
// request too. It ends every goroutine the session started.
func (b *boshSession) Close() error {
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return nil
	}
	b.closing = true
	if !b.chatting {
		b.mu.Unlock()
		return b.closeIdle()
	}
	err := b.postTerminateLocked()
	b.mu.Unlock()
	if err == nil {
		t := time.NewTimer(stepTimeout)
		select {
		case <-b.done:
		case <-t.C:
			err = fmt.Errorf("loadgen: BOSH session %s: no answer to the terminate within %v", b.sid, stepTimeout)
		}
		t.Stop()
	}
	b.mu.Lock()
	b.endLocked(nil)
	for _, bc := range b.conns {
		if bc != nil {
			bc.conn.Close() // ends a reader still waiting for an answer
		}
	}
	b.mu.Unlock()
	b.readers.Wait()
	return err
}

// postTerminateLocked sends the terminate once a connection is free
// (within stepTimeout); the readers post no more polls meanwhile.
func (b *boshSession) postTerminateLocked() error {
	t := time.NewTimer(stepTimeout)
	defer t.Stop()
	for !b.ended {
		bc, err := b.freeConnLocked()
		if err != nil {
			return err
		}
		if bc != nil {
			if wait := b.pollLandingLocked(bc); wait > 0 {
				b.sleepLocked(wait)
				continue
			}
			err := b.postLocked(bc, b.body(" type='terminate'", "<presence type='unavailable'/>"))
			b.closeRID = b.rid
			return err
		}
		if err := b.waitFreedLocked(t.C); err != nil {
			return err
		}
	}
	return nil
}

// closeIdle logs out a session that never chatted, as it always did: the
// terminate on a second connection, answered at once, while the first
// one's request is still held.
func (b *boshSession) closeIdle() error {
	defer func() {
		b.conns[0].conn.Close()
		b.mu.Lock()
		b.endLocked(nil)
		b.mu.Unlock()
	}()
	time.Sleep(pollLanding - time.Since(b.conns[0].pollAt)) // only right after the login
	ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
	defer cancel()
	c, err := b.d.DialContext(ctx, "tcp", b.t.Addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(stepTimeout))
	_, err = b.roundTrip(newBOSHConn(c, 1024), b.body(" type='terminate'", "<presence type='unavailable'/>"))
	return err
}
