package xmlstream

import "github.com/megaphone-im/megaphone/etf"

// Name returns the name of an #xmlel{} term, or "" for anything else.
func Name(el etf.Term) string {
	if t, ok := el.(etf.Tuple); ok && len(t) == 4 && t[0] == etf.Atom("xmlel") {
		return string(asBytes(t[1]))
	}
	return ""
}

// Attr returns an attribute of an #xmlel{} or {xmlstreamstart, ...} term,
// or "" if it has none.
func Attr(el etf.Term, key string) string {
	if t, ok := el.(etf.Tuple); ok && len(t) >= 3 {
		return attrValue(t[2], key)
	}
	return ""
}

func asBytes(t etf.Term) []byte {
	b, _ := t.([]byte)
	return b
}

func attrKey(a etf.Term) string {
	if p, ok := a.(etf.Tuple); ok && len(p) == 2 {
		return string(asBytes(p[0]))
	}
	return ""
}

func attrValue(attrs etf.Term, key string) string {
	list, _ := attrs.(etf.List)
	for _, a := range list {
		if p, ok := a.(etf.Tuple); ok && len(p) == 2 && string(asBytes(p[0])) == key {
			return string(asBytes(p[1]))
		}
	}
	return ""
}

// nsBind is resource binding's namespace (RFC 6120 §7).
const nsBind = "urn:ietf:params:xml:ns:xmpp-bind"

// BoundJID returns the JID in ejabberd's answer to a resource binding
// (`<iq type='result'><bind><jid>…</jid></bind></iq>`, as the event
// {xmlstreamelement, El} c2s writes), or "" for any other event. The
// sidecar learns a stream's JID this way, from ejabberd's own word, at
// the cost of one comparison per event until the stream is bound.
func BoundJID(ev etf.Term) string {
	t, ok := ev.(etf.Tuple)
	if !ok || len(t) != 2 || t[0] != etf.Atom("xmlstreamelement") {
		return ""
	}
	iq := t[1]
	if Name(iq) != "iq" || Attr(iq, "type") != "result" {
		return ""
	}
	bind := child(iq, "bind")
	if bind == nil || Attr(bind, "xmlns") != nsBind {
		return ""
	}
	return text(child(bind, "jid"))
}

// child returns the first child element of el named name, or nil.
func child(el etf.Term, name string) etf.Term {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 {
		return nil
	}
	children, _ := t[3].(etf.List)
	for _, c := range children {
		if Name(c) == name {
			return c
		}
	}
	return nil
}

// text returns the character data directly inside el.
func text(el etf.Term) string {
	t, ok := el.(etf.Tuple)
	if !ok || len(t) != 4 {
		return ""
	}
	children, _ := t[3].(etf.List)
	var s []byte
	for _, c := range children {
		if cd, ok := c.(etf.Tuple); ok && len(cd) == 2 && cd[0] == etf.Atom("xmlcdata") {
			s = append(s, asBytes(cd[1])...)
		}
	}
	return string(s)
}
