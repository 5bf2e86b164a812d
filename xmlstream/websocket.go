package xmlstream

import (
	"bytes"

	"github.com/megaphone-im/megaphone/etf"
)

// RFC 7395 frames an XMPP stream over WebSocket with <open/> and <close/>
// in this namespace instead of <stream:stream> and </stream:stream>.
const nsFraming = "urn:ietf:params:xml:ns:xmpp-framing"

// FromWebSocket turns one parsed WebSocket message into the event c2s
// expects: <open/> becomes the stream header, <close/> the stream end, and
// any other element stays as it is.
func FromWebSocket(el etf.Term) etf.Term {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 || attrValue(t[2], "xmlns") != nsFraming {
		return el
	}
	switch string(asBytes(t[1])) {
	case "open":
		attrs := etf.List{
			etf.Tuple{[]byte("xmlns:stream"), []byte("http://etherx.jabber.org/streams")},
			etf.Tuple{[]byte("xmlns"), []byte("jabber:client")},
		}
		for _, a := range t[2].(etf.List) {
			if k := attrKey(a); k != "xmlns" && k != "xmlns:stream" {
				attrs = append(attrs, a)
			}
		}
		return etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"), attrs}
	case "close":
		return etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")}
	}
	return el
}

// AppendWebSocketMessage renders one c2s event as the text of one
// WebSocket message. It returns ok=false for events that have no message
// of their own (whitespace keepalives).
func AppendWebSocketMessage(b []byte, ev etf.Term) (_ []byte, ok bool, err error) {
	t, isTuple := ev.(etf.Tuple)
	if !isTuple || len(t) < 2 {
		return b, false, ErrBadTerm
	}
	switch t[0] {
	case etf.Atom("xmlstreamstart"):
		if len(t) != 3 {
			return b, false, ErrBadTerm
		}
		attrs := etf.List{etf.Tuple{[]byte("xmlns"), []byte(nsFraming)}}
		list, _ := t[2].(etf.List)
		for _, a := range list {
			if k := attrKey(a); k != "xmlns" && k != "xmlns:stream" {
				attrs = append(attrs, a)
			}
		}
		b, err = AppendElement(b, etf.Tuple{etf.Atom("xmlel"), []byte("open"), attrs, etf.List{}})
		return b, err == nil, err
	case etf.Atom("xmlstreamend"):
		b, err = AppendElement(b, etf.Tuple{etf.Atom("xmlel"), []byte("close"),
			etf.List{etf.Tuple{[]byte("xmlns"), []byte(nsFraming)}}, etf.List{}})
		return b, err == nil, err
	case etf.Atom("xmlstreamelement"):
		el, isEl := t[1].(etf.Tuple)
		if !isEl || len(el) != 4 {
			return b, false, ErrBadTerm
		}
		// Each message is a document of its own, so namespaces the
		// stream header declared must be declared on the element.
		name := asBytes(el[1])
		attrs, _ := el[2].(etf.List)
		switch {
		case bytes.HasPrefix(name, []byte("stream:")) && attrValue(attrs, "xmlns:stream") == "":
			attrs = append(etf.List{etf.Tuple{[]byte("xmlns:stream"), []byte("http://etherx.jabber.org/streams")}}, attrs...)
		case !bytes.Contains(name, []byte(":")) && attrValue(attrs, "xmlns") == "":
			attrs = append(etf.List{etf.Tuple{[]byte("xmlns"), []byte("jabber:client")}}, attrs...)
		}
		b, err = AppendElement(b, etf.Tuple{el[0], el[1], attrs, el[3]})
		return b, err == nil, err
	case etf.Atom("xmlstreamraw"):
		raw := asBytes(t[1])
		if len(bytes.TrimSpace(raw)) == 0 {
			return b, false, nil // whitespace ping: WebSocket has its own
		}
		return append(b, raw...), true, nil
	}
	return b, false, ErrBadTerm
}
