package xmlstream

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/megaphone-im/megaphone/etf"
)

func events(t *testing.T, in string, limits Limits) ([]etf.Term, error) {
	t.Helper()
	p := NewParser(strings.NewReader(in), limits)
	var out []etf.Term
	for i := 0; i < 1000; i++ {
		ev, err := p.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, ev)
	}
	t.Fatal("parser did not stop")
	return nil, nil
}

const header = `<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0' xml:lang='en'>`

func TestClientStream(t *testing.T) {
	in := header +
		`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGRlbW8=</auth>` + "\n  " +
		`<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>` +
		`<message to='bob@localhost' type='chat'><body>a-&gt;b &lt;&amp;&gt;"' ünï 🚀</body><x:y xmlns:x='urn:x'/></message>` +
		`</stream:stream>`
	evs, err := events(t, in, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 5 {
		t.Fatalf("%d events: %#v", len(evs), evs)
	}
	start := evs[0].(etf.Tuple)
	if start[0] != etf.Atom("xmlstreamstart") || string(start[1].([]byte)) != "stream:stream" {
		t.Errorf("start %#v", start)
	}
	wantAttrs := etf.List{
		etf.Tuple{[]byte("xmlns"), []byte("jabber:client")},
		etf.Tuple{[]byte("xmlns:stream"), []byte("http://etherx.jabber.org/streams")},
		etf.Tuple{[]byte("to"), []byte("localhost")},
		etf.Tuple{[]byte("version"), []byte("1.0")},
		etf.Tuple{[]byte("xml:lang"), []byte("en")},
	}
	if !reflect.DeepEqual(start[2], wantAttrs) {
		t.Errorf("header attrs %#v", start[2])
	}
	if restart := evs[2].(etf.Tuple); restart[0] != etf.Atom("xmlstreamstart") {
		t.Errorf("restart not seen: %#v", restart)
	}
	msg := evs[3].(etf.Tuple)
	want := etf.Tuple{etf.Atom("xmlel"), []byte("message"),
		etf.List{etf.Tuple{[]byte("to"), []byte("bob@localhost")}, etf.Tuple{[]byte("type"), []byte("chat")}},
		etf.List{
			etf.Tuple{etf.Atom("xmlel"), []byte("body"), etf.List{}, etf.List{etf.Tuple{etf.Atom("xmlcdata"), []byte(`a->b <&>"' ünï 🚀`)}}},
			etf.Tuple{etf.Atom("xmlel"), []byte("x:y"), etf.List{etf.Tuple{[]byte("xmlns:x"), []byte("urn:x")}}, etf.List{}},
		}}
	if !reflect.DeepEqual(msg, want) {
		t.Errorf("message\n got %#v\nwant %#v", msg, want)
	}
	if end := evs[4].(etf.Tuple); end[0] != etf.Atom("xmlstreamend") {
		t.Errorf("end %#v", end)
	}

	// What we parse, we write back to the same XML, and it parses the same.
	b, err := AppendElement(nil, msg)
	if err != nil {
		t.Fatal(err)
	}
	again, err := events(t, header+string(b), Limits{})
	if err != nil || !reflect.DeepEqual(again[1], msg) {
		t.Errorf("round trip via %s: %#v %v", b, again, err)
	}
}

func TestBadStreams(t *testing.T) {
	cases := map[string]struct {
		in   string
		want error
	}{
		"garbage before header": {"GET / HTTP/1.1\r\n\r\n", ErrNotWellFormed},
		"wrong root":            {"<html>", ErrNotWellFormed},
		"dtd bomb":              {`<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>` + header, ErrRestrictedXML},
		"entity in stanza":      {header + `<message>&lol;</message>`, ErrNotWellFormed},
		"comment":               {header + `<!-- hi -->`, ErrRestrictedXML},
		"pi in stream":          {header + `<?php x?>`, ErrRestrictedXML},
		"mismatched":            {header + `<message></iq>`, ErrNotWellFormed},
		"text at stream level":  {header + `hello`, ErrNotWellFormed},
		"big stanza":            {header + `<message><body>` + strings.Repeat("x", 200<<10) + `</body></message>`, ErrPolicyViolation},
		"deep":                  {header + strings.Repeat("<a>", 100), ErrPolicyViolation},
		"eof inside stanza":     {header + `<message><body>`, ErrNotWellFormed},
		// One token each: they must count against the limit too, or a
		// client has the sidecar buffer any amount of one start tag.
		"huge start tag":  {header + `<message to='` + strings.Repeat("x", 200<<10) + `'/>`, ErrPolicyViolation},
		"huge header":     {`<stream:stream xmlns:stream='http://etherx.jabber.org/streams' a='` + strings.Repeat("x", 200<<10) + `'>`, ErrPolicyViolation},
		"huge whitespace": {header + strings.Repeat(" ", 200<<10) + `<a/>`, ErrPolicyViolation},
	}
	for name, c := range cases {
		_, err := events(t, c.in, Limits{MaxStanzaBytes: 64 << 10})
		if !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
	}
}

func TestWriter(t *testing.T) {
	var b []byte
	var err error
	for _, ev := range []etf.Term{
		etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"), etf.List{
			etf.Tuple{[]byte("xmlns"), []byte("jabber:client")}, etf.Tuple{[]byte("id"), []byte(`a'b"<`)}}},
		etf.Tuple{etf.Atom("xmlstreamelement"), etf.Tuple{etf.Atom("xmlel"), []byte("message"), etf.List{},
			etf.List{etf.Tuple{etf.Atom("xmlcdata"), []byte("1 < 2 & 3 > 2")}}}},
		etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")},
	} {
		if b, err = AppendEvent(b, ev); err != nil {
			t.Fatal(err)
		}
	}
	want := `<stream:stream xmlns='jabber:client' id='a&apos;b&quot;&lt;'><message>1 &lt; 2 &amp; 3 &gt; 2</message></stream:stream>`
	if string(b) != want {
		t.Errorf("got  %s\nwant %s", b, want)
	}
	// A term cannot smuggle markup in through a name.
	if _, err := AppendElement(nil, etf.Tuple{etf.Atom("xmlel"), []byte("a><script"), etf.List{}, etf.List{}}); err == nil {
		t.Error("markup in an element name accepted")
	}
}

func TestParseElement(t *testing.T) {
	el, err := ParseElement([]byte(`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>`), Limits{})
	if err != nil || Name(el) != "open" {
		t.Fatalf("%#v %v", el, err)
	}
	for _, bad := range []string{``, `<a/><b/>`, `text`, `<a>`, `<!DOCTYPE x><a/>`} {
		if _, err := ParseElement([]byte(bad), Limits{}); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	if _, err := ParseElement([]byte(`<a>`+strings.Repeat("x", 100)+`</a>`), Limits{MaxStanzaBytes: 50}); !errors.Is(err, ErrPolicyViolation) {
		t.Errorf("oversized message: %v", err)
	}
}
