package xmlstream

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/megaphone-im/megaphone/etf"
)

// fuzzLimits are small so that the fuzzer reaches the limits often.
var fuzzLimits = Limits{MaxStanzaBytes: 2048, MaxDepth: 8}

// roomy parses what the writer wrote back: escaping may make it longer
// than the client's original.
var roomy = Limits{MaxStanzaBytes: 1 << 20, MaxDepth: 64}

// A client stream, byte by byte: headers, restarts, stanzas, the end. The
// parser must never panic or loop, must never hand c2s an element over the
// limits, and every element it hands c2s must encode as ETF and come back
// the same through the writer (what c2s echoes, the client can read).
func FuzzParser(f *testing.F) {
	for _, seed := range []string{
		header + `<message to='b'><body>hi</body></message></stream:stream>`,
		header + `<iq type='get'><query xmlns='jabber:iq:roster'/></iq>`,
		// A restart after SASL, with the declaration again.
		header + `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGRlbW8=</auth>` +
			`<?xml version='1.0'?>` + header + `<presence/> </stream:stream>`,
		header + `<message xml:lang='de' x:a='1' xmlns:x='urn:x'><body><![CDATA[<&>]]>&#x1F680;&amp;</body></message>`,
		header + `<a><b><c><d><e><f><g><h><i/></h></g></f></e></d></c></b></a>`,
		header + `<message to='` + strings.Repeat("x", 3000) + `'/>`,
		header + `<!DOCTYPE x>`, header + `<!-- c -->`, header + `<?pi x?>`, `<html/>`, header + `</stream:stream><a/>`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		p := NewParser(strings.NewReader(in), fuzzLimits)
		// Every event consumes at least one byte of input.
		for i := 0; i <= len(in)+1; i++ {
			ev, err := p.Next()
			if err == io.EOF {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrNotWellFormed) && !errors.Is(err, ErrRestrictedXML) && !errors.Is(err, ErrPolicyViolation) {
					t.Fatalf("error without a stream condition: %v", err)
				}
				return
			}
			checkEvent(t, ev)
		}
		t.Fatalf("parser gave more events than the input has bytes")
	})
}

func checkEvent(t *testing.T, ev etf.Term) {
	t.Helper()
	if _, err := etf.Encode(ev); err != nil {
		t.Fatalf("event %#v does not encode: %v", ev, err)
	}
	tup := ev.(etf.Tuple)
	switch tup[0] {
	case etf.Atom("xmlstreamstart"), etf.Atom("xmlstreamend"):
		if string(tup[1].([]byte)) != "stream:stream" {
			t.Fatalf("stream event named %q", tup[1])
		}
	case etf.Atom("xmlel"):
		if d := depth(ev); d > fuzzLimits.MaxDepth {
			t.Fatalf("element %d deep passed a limit of %d", d, fuzzLimits.MaxDepth)
		}
		// Decoded content is never longer than its source (entities only
		// shrink), so content over the limit means the limit failed.
		if n := contentBytes(ev); n > fuzzLimits.MaxStanzaBytes {
			t.Fatalf("element with %d bytes of content passed a limit of %d", n, fuzzLimits.MaxStanzaBytes)
		}
		out, err := AppendElement(nil, ev)
		if err != nil {
			t.Fatalf("parsed element does not serialise: %v", err)
		}
		again, err := ParseElement(out, roomy)
		if err != nil {
			t.Fatalf("written element %q does not parse: %v", out, err)
		}
		if !reflect.DeepEqual(mergeText(again), mergeText(ev)) {
			t.Fatalf("round trip through %q\n got %#v\nwant %#v", out, again, ev)
		}
	default:
		t.Fatalf("unknown event %#v", ev)
	}
}

func depth(el etf.Term) int {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 {
		return 0
	}
	deepest := 0
	for _, c := range t[3].(etf.List) {
		deepest = max(deepest, depth(c))
	}
	return 1 + deepest
}

func contentBytes(el etf.Term) int64 {
	t := el.(etf.Tuple)
	if t[0] == etf.Atom("xmlcdata") {
		return int64(len(t[1].([]byte)))
	}
	n := int64(len(t[1].([]byte)))
	for _, a := range t[2].(etf.List) {
		kv := a.(etf.Tuple)
		n += int64(len(kv[0].([]byte)) + len(kv[1].([]byte)))
	}
	for _, c := range t[3].(etf.List) {
		n += contentBytes(c)
	}
	return n
}

// mergeText joins adjacent text children: a CDATA section next to plain
// text is two tokens when read and one when written back.
func mergeText(el etf.Term) etf.Term {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 {
		return el
	}
	var kids etf.List
	for _, c := range t[3].(etf.List) {
		c = mergeText(c)
		if ct, ok := c.(etf.Tuple); ok && ct[0] == etf.Atom("xmlcdata") && len(kids) > 0 {
			if prev, ok := kids[len(kids)-1].(etf.Tuple); ok && prev[0] == etf.Atom("xmlcdata") {
				kids[len(kids)-1] = etf.Tuple{prev[0], append(bytes.Clone(prev[1].([]byte)), ct[1].([]byte)...)}
				continue
			}
		}
		kids = append(kids, c)
	}
	if kids == nil {
		kids = etf.List{}
	}
	return etf.Tuple{t[0], t[1], t[2], kids}
}

// RFC 7395 framing: one WebSocket message, one element, <open/> and
// <close/> turned into the stream header and end. Whatever the message,
// no panic; a framed message that parses comes back the same when the
// sidecar writes it (the <open/> ejabberd answers with is built the same
// way).
func FuzzWebSocketFraming(f *testing.F) {
	for _, seed := range []string{
		`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>`,
		`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0" xml:lang="en" xmlns:stream="x"/>`,
		`<close xmlns="urn:ietf:params:xml:ns:xmpp-framing"/>`,
		`<message xmlns="jabber:client" to="b@x"><body>hi</body></message>`,
		`<stream:features xmlns:stream="http://etherx.jabber.org/streams"/>`,
		`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing"><x/></open>`,
		`<open/>`, ``, `<a/><b/>`, `text`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		el, err := ParseElement(msg, fuzzLimits)
		if err != nil {
			return
		}
		ev := FromWebSocket(el)
		if _, err := etf.Encode(ev); err != nil {
			t.Fatalf("event %#v does not encode: %v", ev, err)
		}
		// What ejabberd would send back of the same shape.
		out := ev
		if tup := ev.(etf.Tuple); tup[0] == etf.Atom("xmlel") {
			out = etf.Tuple{etf.Atom("xmlstreamelement"), ev}
		}
		written, ok, err := AppendWebSocketMessage(nil, out)
		if err != nil || !ok {
			t.Fatalf("event %#v not written: %v %v", out, ok, err)
		}
		back, err := ParseElement(written, roomy)
		if err != nil {
			t.Fatalf("written message %q does not parse: %v", written, err)
		}
		if tup := ev.(etf.Tuple); tup[0] != etf.Atom("xmlel") {
			// The framing round trip: <open/> and <close/> both ways.
			if again := FromWebSocket(back); !reflect.DeepEqual(again, ev) {
				t.Fatalf("framing round trip through %q\n got %#v\nwant %#v", written, again, ev)
			}
		}
	})
}

// Terms from ejabberd (c2s_out events), as a compromised node could send
// them: anything that decodes must be written or refused, never panic, and
// never let a name carry markup into the client's stream.
func FuzzWriterHostileTerms(f *testing.F) {
	for _, ev := range []etf.Term{
		etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"), etf.List{etf.Tuple{[]byte("id"), []byte("x")}}},
		etf.Tuple{etf.Atom("xmlstreamelement"), etf.Tuple{etf.Atom("xmlel"), []byte("message"),
			etf.List{etf.Tuple{[]byte("to"), []byte("a@b")}}, etf.List{etf.Tuple{etf.Atom("xmlcdata"), []byte("<&>")}}}},
		etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")},
		etf.Tuple{etf.Atom("xmlstreamraw"), []byte(" ")},
		etf.Tuple{etf.Atom("xmlstreamcdata"), []byte("x")},
		etf.Tuple{etf.Atom("xmlstreamstart"), []byte("a><b"), etf.List{}},
	} {
		b, err := etf.Encode(ev)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, _, err := etf.Decode(b)
		if err != nil {
			return
		}
		if tup, ok := ev.(etf.Tuple); ok && len(tup) > 1 && tup[0] == etf.Atom("xmlstreamraw") {
			return // raw bytes are ejabberd's to send as they are
		}
		out, err := AppendEvent(nil, ev)
		if err == nil {
			checkNoInjectedMarkup(t, ev, out)
		}
		_, _, _ = AppendWebSocketMessage(nil, ev)
	})
}

// checkNoInjectedMarkup: a written event holds as many '<' as the term has
// element tags, since text and attribute values are escaped.
func checkNoInjectedMarkup(t *testing.T, ev etf.Term, out []byte) {
	t.Helper()
	want := 0
	tup := ev.(etf.Tuple)
	switch tup[0] {
	case etf.Atom("xmlstreamstart"), etf.Atom("xmlstreamend"):
		want = 1
	case etf.Atom("xmlstreamelement"):
		want = tags(tup[1])
	}
	if got := bytes.Count(out, []byte("<")); got != want {
		t.Fatalf("%#v written as %q: %d tags, want %d", ev, out, got, want)
	}
}

func tags(el etf.Term) int {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 {
		return 0
	}
	kids, _ := t[3].(etf.List)
	n := 1
	if len(kids) > 0 {
		n = 2 // open and close
	}
	for _, c := range kids {
		n += tags(c)
	}
	return n
}
