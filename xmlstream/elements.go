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
