package test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/test/harness"
	"github.com/megaphone-im/megaphone/xmlstream"
)

// hostileValues hands out distinct hostile strings and counts them. Each
// carries a sequence number, so no two are equal and a leak of one atom
// per value shows as one atom per value.
type hostileValues struct{ n atomic.Int64 }

// The shapes client data takes: markup characters (escaped on the wire),
// non-ASCII, bidi overrides, format strings, paths, Erlang-looking text.
var hostileSpice = []string{`<&>'"`, "ünï🚀", "\u202e", "%s%n~p~n", "../../", "'EXIT'", "{a,b}", "\t \n", "ſ", "x"}

func (h *hostileValues) value() string {
	i := h.n.Add(1)
	return hostileSpice[i%int64(len(hostileSpice))] + strconv.FormatInt(i, 36)
}

// name is a hostile XML name: valid, so that it passes the sidecar's
// parser and reaches ejabberd, with or without a prefix.
var hostileNameStarts = []string{"h", "é", "ж", "_", "a.b-", "x:y"}

func (h *hostileValues) name() string {
	i := h.n.Add(1)
	return hostileNameStarts[i%int64(len(hostileNameStarts))] + strconv.FormatInt(i, 36)
}

// jid is a hostile JID that ejabberd must not route off the node:
// unknown local users and resources at localhost, or malformed JIDs.
func (h *hostileValues) jid() string {
	i := h.n.Add(1)
	s := strconv.FormatInt(i, 36)
	switch i % 4 {
	case 0:
		return "nobody" + s + "@localhost/ünï" + s
	case 1:
		return "@@" + s + "@localhost"
	case 2:
		return "ж" + s + "@localhost"
	default:
		return s + "@localhost/" + strings.Repeat("r", 1100) // resource too long
	}
}

// host is a hostile domain, for places where ejabberd answers
// host-unknown instead of routing (a stream's or a BOSH session's `to`).
func (h *hostileValues) host() string {
	i := h.n.Add(1)
	return hostileNameStarts[i%int64(len(hostileNameStarts))] + strconv.FormatInt(i, 36) + ".invalid"
}

// headerName is a valid HTTP token that is still nobody's header.
func (h *hostileValues) headerName() string {
	return "X-H~" + strconv.FormatInt(h.n.Add(1), 36) + "!#$%&'*+-.^_`|"
}

// headerValue is a hostile value an HTTP client can send: no line breaks.
func (h *hostileValues) headerValue() string { return strings.ReplaceAll(h.value(), "\n", "~") }

// rid is a distinct rid, numeric (past any int64) or not.
func (h *hostileValues) rid() string {
	i := h.n.Add(1)
	if i%2 == 0 {
		return "1844674407370955" + strconv.FormatInt(i, 10)
	}
	return hostileSpice[i%int64(len(hostileSpice))] + strconv.FormatInt(i, 36)
}

func attr(name, value string) string { return " " + name + "='" + xmlstream.EscapeAttr(value) + "'" }

// hostileVolume is how many requests, stanzas and streams carry the
// values; at full volume they hold over 100,000 of them.
type hostileVolume struct {
	boshRequests, stanzas, wsStreams int
}

// 100,000 distinct hostile values (JIDs in to/from, attribute and element
// names and values, BOSH sids, rids and hosts, xml:lang, HTTP headers)
// cross the sidecar into ejabberd over BOSH, XMPP over TLS and WebSocket.
// ejabberd turns none of them into an atom, and every process they caused
// ends: atom_count and process_count return to their baseline.
func TestHostileValuesLeakNoAtomsOrProcesses(t *testing.T) {
	forEachTarget(t, testHostileValuesLeakNoAtomsOrProcesses)
}

func testHostileValuesLeakNoAtomsOrProcesses(t *testing.T, tg target) {
	ej := tg.startEjabberd(t, harness.Options{})
	sc := startStreamSidecar(t, ej)

	// A first, small round loads every module and creates every atom the
	// code paths themselves need; the baseline is taken after it.
	var warm hostileValues
	sendHostile(t, sc, &warm, hostileVolume{boshRequests: 8, stanzas: 8, wsStreams: 8})
	waitUntil(t, 30*time.Second, "the warm-up round's processes end", func() bool {
		return evalInt(t, ej, leftoverExpr) == 0
	})
	atoms := evalInt(t, ej, "erlang:system_info(atom_count)")
	procs := evalInt(t, ej, "erlang:system_info(process_count)")
	fds := sc.openFiles(t)

	var values hostileValues
	start := time.Now()
	sendHostile(t, sc, &values, hostileVolume{boshRequests: 400, stanzas: 200, wsStreams: 400})
	t.Logf("%d distinct hostile values sent in %s", values.n.Load(), time.Since(start).Round(time.Millisecond))
	if values.n.Load() < 100_000 {
		t.Fatalf("only %d hostile values sent, want 100,000", values.n.Load())
	}

	// Slack, fixed and far below one per value: each Eval's probe is a new
	// node, whose name becomes an atom on ejabberd (a handful of probes
	// run between the two counts), and a module ejabberd loads late (a
	// timer's first tick) brings its atoms.
	const atomSlack = 200
	// Each probe's connection has its processes on ejabberd while it
	// runs (both counts include them), and ejabberd's own periodic
	// workers come and go.
	const procSlack = 10
	waitUntil(t, 40*time.Second, "ejabberd's processes back to baseline", func() bool {
		return evalInt(t, ej, "erlang:system_info(process_count)") <= procs+procSlack
	})
	afterAtoms := evalInt(t, ej, "erlang:system_info(atom_count)")
	t.Logf("atoms %d -> %d, processes %d -> %d", atoms, afterAtoms, procs,
		evalInt(t, ej, "erlang:system_info(process_count)"))
	if afterAtoms > atoms+atomSlack {
		t.Errorf("ejabberd's atom table grew by %d over %d hostile values", afterAtoms-atoms, values.n.Load())
	}
	waitUntil(t, 20*time.Second, "the sidecar's sockets back to baseline", func() bool { return sc.openFiles(t) <= fds })
	select {
	case <-sc.exited:
		t.Fatalf("the sidecar exited:\n%s", tail(sc.logs(), 40))
	default:
	}
	rawLogin(t, sc.c2sTLS, "alice").Close() // and it still serves
}

// sendHostile sends hostile values over every transport at once and waits
// until every request and stream is done.
func sendHostile(t *testing.T, sc *streamSidecar, h *hostileValues, v hostileVolume) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const parallel = 4
	errs := make(chan error, 3*parallel)
	var wg sync.WaitGroup
	run := func(total int, f func(ctx context.Context, n int) error) {
		for w := 0; w < parallel; w++ {
			n := total / parallel
			if w < total%parallel {
				n++
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := f(ctx, n); err != nil {
					errs <- err
				}
			}()
		}
	}
	run(v.boshRequests, func(ctx context.Context, n int) error { return hostileBOSH(ctx, sc.url(), h, n) })
	run(v.wsStreams, func(ctx context.Context, n int) error { return hostileStreamHeaders(ctx, sc.wsURL(), h, n) })
	stanzas := v.stanzas
	users := []string{"alice", "bob"}
	for _, user := range users {
		conn := rawLogin(t, sc.c2sTLS, user)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			if err := hostileStanzas(ctx, conn, h, stanzas/len(users)); err != nil {
				errs <- fmt.Errorf("%s's stream: %w", user, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// hostileBOSH posts n BOSH bodies full of hostile values, each with 40
// hostile HTTP headers: session creations for unknown hosts, and requests
// for sessions that do not exist. Each must get a BOSH answer.
func hostileBOSH(ctx context.Context, url string, h *hostileValues, n int) error {
	client := &http.Client{Timeout: 20 * time.Second}
	defer client.CloseIdleConnections()
	for i := 0; i < n; i++ {
		var b strings.Builder
		b.WriteString("<body xmlns='http://jabber.org/protocol/httpbind'")
		b.WriteString(attr("rid", h.rid()))
		if i%2 == 0 {
			b.WriteString(attr("to", h.host()) + attr("wait", "5") + attr("hold", "1") + attr("ver", h.value()))
		} else {
			b.WriteString(attr("sid", h.value()))
		}
		b.WriteString(attr("xml:lang", h.value()) + attr("from", h.jid()) + attr("route", h.value()))
		for k := 0; k < 60; k++ {
			b.WriteString(attr(h.name(), h.value()))
		}
		b.WriteString("><message xmlns='jabber:client'" + attr("to", h.jid()) + attr("from", h.jid()) + attr("xml:lang", h.value()) + ">")
		for k := 0; k < 40; k++ {
			el := h.name()
			b.WriteString("<" + el + attr(h.name(), h.value()) + ">" + xmlstream.EscapeAttr(h.value()) + "</" + el + ">")
		}
		b.WriteString("</message></body>")
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(b.String()))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "text/xml; charset=utf-8")
		for k := 0; k < 40; k++ {
			req.Header.Set(h.headerName(), h.headerValue())
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("BOSH request %d: %w", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		// ejabberd answers a rid that is no number with 400, the rest
		// with a terminate (host-unknown, item-not-found).
		terminated := resp.StatusCode == http.StatusOK && strings.Contains(string(body), "type='terminate'")
		if !terminated && resp.StatusCode != http.StatusBadRequest {
			return fmt.Errorf("BOSH request %d: %d %q, want a terminate or 400", i, resp.StatusCode, body)
		}
	}
	return nil
}

// hostileStreamHeaders opens n WebSocket streams whose <open/> carries
// hostile values (an unknown host, xml:lang, from, attributes); ejabberd
// must answer each with a stream error and close.
func hostileStreamHeaders(ctx context.Context, url string, h *hostileValues, n int) error {
	dialer := websocket.Dialer{HandshakeTimeout: 10 * time.Second, Subprotocols: []string{"xmpp"}}
	for i := 0; i < n; i++ {
		ws, _, err := dialer.DialContext(ctx, url, nil)
		if err != nil {
			return fmt.Errorf("stream %d: %w", i, err)
		}
		var open strings.Builder
		open.WriteString("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' version='1.0'")
		open.WriteString(attr("to", h.host()) + attr("from", h.jid()) + attr("xml:lang", h.value()) + attr("id", h.value()))
		for k := 0; k < 20; k++ {
			open.WriteString(attr(h.name(), h.value()))
		}
		open.WriteString("/>")
		_ = ws.SetReadDeadline(time.Now().Add(15 * time.Second))
		_ = ws.SetWriteDeadline(time.Now().Add(15 * time.Second))
		err = ws.WriteMessage(websocket.TextMessage, []byte(open.String()))
		sawError := false
		for k := 0; err == nil && k < 5 && !sawError; k++ {
			var msg []byte
			_, msg, err = ws.ReadMessage()
			sawError = strings.Contains(string(msg), "stream:error")
		}
		ws.Close()
		if !sawError {
			return fmt.Errorf("stream %d to an unknown host: no stream error (%v)", i, err)
		}
	}
	return nil
}

// hostileStanzas sends n IQs on a logged-in stream, each to a hostile JID
// with 100 elements of hostile names, attributes and text, and reads the
// error answers as they come. Then it ends the stream.
func hostileStanzas(ctx context.Context, conn interface {
	io.ReadWriter
	SetDeadline(time.Time) error
}, h *hostileValues, n int) error {
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	answers := make(chan int, 1)
	go func() { answers <- countErrorAnswers(conn) }()
	for i := 0; i < n; i++ {
		var b strings.Builder
		b.WriteString("<iq type='get'" + attr("id", h.value()) + attr("to", h.jid()) + attr("xml:lang", h.value()) + ">")
		b.WriteString("<query" + attr("xmlns", "urn:hostile:"+h.value()) + ">")
		for k := 0; k < 100; k++ {
			el := h.name()
			b.WriteString("<" + el + attr(h.name(), h.value()) + attr("from", h.jid()) + ">" +
				xmlstream.EscapeAttr(h.value()) + "</" + el + ">")
		}
		b.WriteString("</query></iq>")
		if _, err := io.WriteString(conn, b.String()); err != nil {
			return fmt.Errorf("stanza %d: %w", i, err)
		}
	}
	if _, err := io.WriteString(conn, "</stream:stream>"); err != nil {
		return err
	}
	if got := <-answers; got < n {
		return fmt.Errorf("%d error answers to %d hostile IQs", got, n)
	}
	return nil
}

// countErrorAnswers reads a stream to its end and counts the error
// stanzas in it.
func countErrorAnswers(r io.Reader) int {
	const marker, end = "type='error'", "</stream:stream>"
	buf := make([]byte, 64<<10)
	carry, count := "", 0
	for {
		k, err := r.Read(buf)
		s := carry + string(buf[:k])
		// Markers wholly in the carry were counted with the last read.
		count += strings.Count(s, marker) - strings.Count(carry, marker)
		if strings.Contains(s, end) || err != nil {
			return count
		}
		// Enough to find a marker or the end split across two reads.
		carry = s[max(0, len(s)-len(end)):]
	}
}
