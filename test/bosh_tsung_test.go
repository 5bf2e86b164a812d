package test

import (
	"bufio"
	"encoding/base64"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// Tsung 1.7's BOSH client (ts_bosh.erl) through the sidecar. With hold=1 it
// keeps its empty poll held on one keep-alive connection and sends each
// stanza on another, reused, one right after the poll: two requests of one
// session on two connections, rid N+1 (the poll) a moment before rid N+2
// (the stanza). The sidecar handled the two on two goroutines and two shim
// workers, so rid N+2 could reach ejabberd_bosh first; ejabberd (23.01 and
// 24.12) then parks N+2 waiting for N+1, holds N+1 as the empty poll it is,
// and never goes back to N+2: the stanza is stuck until the session ends
// (217 of 300 Tsung users stalled so at their <session/> IQ). Here 30
// sessions do Tsung's login and then 5 IQs each, with no think time, every
// IQ a chance for that race; each must be answered (the IQ releases the
// poll, its answer comes at once), not left until the wait runs out.
// Before the fix all 30 stalled; ejabberd's own listener loses this race
// too with a client this quick, so this is not run against it.
func TestBOSHTsungTwoConnectionPattern(t *testing.T) {
	forEachTarget(t, testBOSHTsungTwoConnectionPattern)
}

func testBOSHTsungTwoConnectionPattern(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	const users, rounds = 30, 5
	eval(t, ej, fmt.Sprintf(`[ejabberd_auth:try_register(<<"ts", (integer_to_binary(I))/binary>>, <<"localhost">>,
	    <<"pw", (integer_to_binary(I))/binary>>) || I <- lists:seq(1, %d)], ok`, users))
	sc := startSidecar(t, ej, "")

	errs := make(chan error, users)
	var wg sync.WaitGroup
	for i := 1; i <= users; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &tsungBOSH{addr: sc.addr, path: "/bosh"}
			defer c.closeAll()
			if err := c.run(fmt.Sprintf("ts%d", i), fmt.Sprintf("pw%d", i), rounds); err != nil {
				errs <- fmt.Errorf("ts%d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		t.Error(err)
	}
	if failed > 0 {
		t.Errorf("%d of %d Tsung-style sessions stalled", failed, users)
	}
}

// tsungBOSH does what ts_bosh.erl does: wait 10 (Tsung says 60; the test
// keeps it short), hold 1, a pool of keep-alive connections, and a request
// sent on a free connection (a new one if none) whenever at most one is
// open; when an answer leaves no request open, an empty poll goes out on
// that connection at once.
type tsungBOSH struct {
	addr, path string
	sid        string
	rid        uint64
	free       []*tsConn
	open       map[*tsConn]uint64
	answers    chan tsAnswer
	all        []*tsConn
}

const tsungWait = 10 * time.Second

type tsConn struct {
	net.Conn
	r *bufio.Reader
}

type tsAnswer struct {
	c    *tsConn
	body string
	err  error
}

func (b *tsungBOSH) closeAll() {
	for _, c := range b.all {
		c.Close()
	}
}

func (b *tsungBOSH) conn() (*tsConn, error) {
	if n := len(b.free); n > 0 {
		c := b.free[n-1]
		b.free = b.free[:n-1]
		return c, nil
	}
	raw, err := net.DialTimeout("tcp", b.addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := &tsConn{Conn: raw, r: bufio.NewReader(raw)}
	b.all = append(b.all, c)
	return c, nil
}

// send posts body on c and reads its answer in the background.
func (b *tsungBOSH) send(c *tsConn, body string) error {
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nkeep-alive: true\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s",
		b.path, len(body), body)
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	go func() {
		// Bounded: an answer is due within the wait.
		_ = c.SetReadDeadline(time.Now().Add(tsungWait + 5*time.Second))
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil {
			b.answers <- tsAnswer{c: c, err: err}
			return
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, got)
		}
		b.answers <- tsAnswer{c: c, body: string(got), err: err}
	}()
	return nil
}

func (b *tsungBOSH) wrap(payload string) string {
	b.rid++
	return fmt.Sprintf("<body xmlns='http://jabber.org/protocol/httpbind' rid='%d' sid='%s'>%s</body>", b.rid, b.sid, payload)
}

// stanza sends payload in a request of its own, as Tsung's do_send does,
// then handles answers as its loop does until one holds until.
func (b *tsungBOSH) stanza(payload, until string) error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	body := b.wrap(payload)
	b.open[c] = b.rid
	if err := b.send(c, body); err != nil {
		return err
	}
	return b.await(until)
}

// await handles answers until one holds until (none is bounded: each
// answer comes within the wait or fails its read).
func (b *tsungBOSH) await(until string) error {
	for range 20 {
		a := <-b.answers
		if a.err != nil {
			return fmt.Errorf("waiting for %q: %v", until, a.err)
		}
		if strings.Contains(a.body, "type='terminate'") || strings.Contains(a.body, `type="terminate"`) {
			return fmt.Errorf("waiting for %q: terminate: %s", until, a.body)
		}
		delete(b.open, a.c)
		if len(b.open) == 0 {
			// Tsung's do_receive_http_response: nothing open, so an
			// empty poll goes out at once on the same connection,
			// before the answer reaches the user.
			b.open[a.c] = b.rid + 1
			if err := b.send(a.c, b.wrap("")); err != nil {
				return err
			}
		} else {
			b.free = append(b.free, a.c)
		}
		if strings.Contains(a.body, until) {
			return nil
		}
	}
	return fmt.Errorf("no %q in 20 answers", until)
}

var sidAttr = regexp.MustCompile(`sid=['"]([^'"]+)['"]`)

func (b *tsungBOSH) run(user, password string, rounds int) error {
	b.open = map[*tsConn]uint64{}
	b.answers = make(chan tsAnswer, 8)
	b.rid = 1000 + uint64(rand.IntN(100000))
	// Session creation and SASL: one request at a time, on one connection.
	c, err := b.conn()
	if err != nil {
		return err
	}
	if err := b.send(c, fmt.Sprintf("<body xmlns='http://jabber.org/protocol/httpbind' content='text/xml; charset=utf-8' ver='1.8' to='localhost' rid='%d' xmlns:xmpp='urn:xmpp:xbosh' xmpp:version='1.0' wait='%d' hold='1'/>",
		b.rid, int(tsungWait/time.Second))); err != nil {
		return err
	}
	a := <-b.answers
	m := sidAttr.FindStringSubmatch(a.body)
	if a.err != nil || m == nil {
		return fmt.Errorf("session creation: %v %q", a.err, a.body)
	}
	b.sid = m[1]
	b.free = append(b.free, c)
	plain := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + password))
	if err := b.single("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"+plain+"</auth>", "<success"); err != nil {
		return err
	}
	// The restart: from its answer on, the session is "normal" and keeps a
	// poll open.
	c, err = b.conn()
	if err != nil {
		return err
	}
	b.rid++
	b.open[c] = b.rid
	if err := b.send(c, fmt.Sprintf("<body xmlns='http://jabber.org/protocol/httpbind' rid='%d' sid='%s' xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh' to='localhost'/>", b.rid, b.sid)); err != nil {
		return err
	}
	if err := b.await("stream:features"); err != nil {
		return err
	}
	if err := b.stanza("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>tsung</resource></bind></iq>", "id='bind'"); err != nil {
		return err
	}
	if err := b.stanza("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>", "id='sess'"); err != nil {
		return err
	}
	for i := range rounds {
		id := fmt.Sprintf("ping%d", i)
		if err := b.stanza("<iq type='get' id='"+id+"' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", "id='"+id+"'"); err != nil {
			return err
		}
	}
	// Log out: a terminate on its own connection (Tsung's close).
	c, err = b.conn()
	if err != nil {
		return err
	}
	b.rid++
	return b.send(c, fmt.Sprintf("<body xmlns='http://jabber.org/protocol/httpbind' rid='%d' sid='%s' type='terminate'/>", b.rid, b.sid))
}

// single sends one request while none is open and waits for its answer.
func (b *tsungBOSH) single(payload, until string) error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	if err := b.send(c, b.wrap(payload)); err != nil {
		return err
	}
	a := <-b.answers
	if a.err != nil || !strings.Contains(a.body, until) {
		return fmt.Errorf("waiting for %q: %v %q", until, a.err, a.body)
	}
	b.free = append(b.free, c)
	return nil
}
