package xmlstream

import (
	"errors"
	"fmt"
	"strings"

	"github.com/megaphone-im/megaphone/etf"
)

// ErrBadTerm reports a term from ejabberd that is no stream element.
var ErrBadTerm = errors.New("xmlstream: not a stream element")

// AppendEvent appends the XML for one event c2s hands its socket
// (xmpp_socket:send_xml/2): {xmlstreamstart, Name, Attrs},
// {xmlstreamelement, El}, {xmlstreamend, Name}, {xmlstreamraw, Bin} or
// {xmlstreamcdata, Bin}.
func AppendEvent(b []byte, ev etf.Term) ([]byte, error) {
	t, ok := ev.(etf.Tuple)
	if !ok || len(t) < 2 {
		return b, ErrBadTerm
	}
	switch t[0] {
	case etf.Atom("xmlstreamstart"):
		name, ok := t[1].([]byte)
		if !ok || len(t) != 3 || !validName(name) {
			return b, ErrBadTerm
		}
		b = append(b, '<')
		b = append(b, name...)
		b, err := appendAttrs(b, t[2])
		return append(b, '>'), err
	case etf.Atom("xmlstreamelement"):
		return AppendElement(b, t[1])
	case etf.Atom("xmlstreamend"):
		name, ok := t[1].([]byte)
		if !ok || !validName(name) {
			return b, ErrBadTerm
		}
		b = append(b, "</"...)
		b = append(b, name...)
		return append(b, '>'), nil
	case etf.Atom("xmlstreamraw"):
		raw, ok := t[1].([]byte)
		if !ok {
			return b, ErrBadTerm
		}
		return append(b, raw...), nil
	case etf.Atom("xmlstreamcdata"):
		text, ok := t[1].([]byte)
		if !ok {
			return b, ErrBadTerm
		}
		return appendEscaped(b, text, false), nil
	}
	return b, fmt.Errorf("%w: %v", ErrBadTerm, t[0])
}

// AppendElement appends an #xmlel{} or {xmlcdata, Bin} as XML.
func AppendElement(b []byte, el etf.Term) ([]byte, error) {
	t, ok := el.(etf.Tuple)
	if !ok {
		return b, ErrBadTerm
	}
	switch {
	case len(t) == 2 && t[0] == etf.Atom("xmlcdata"):
		text, ok := t[1].([]byte)
		if !ok {
			return b, ErrBadTerm
		}
		return appendEscaped(b, text, false), nil
	case len(t) == 4 && t[0] == etf.Atom("xmlel"):
		name, ok := t[1].([]byte)
		children, ok2 := t[3].(etf.List)
		if !ok || !ok2 || !validName(name) {
			return b, ErrBadTerm
		}
		b = append(b, '<')
		b = append(b, name...)
		b, err := appendAttrs(b, t[2])
		if err != nil {
			return b, err
		}
		if len(children) == 0 {
			return append(b, "/>"...), nil
		}
		b = append(b, '>')
		for _, c := range children {
			if b, err = AppendElement(b, c); err != nil {
				return b, err
			}
		}
		b = append(b, "</"...)
		b = append(b, name...)
		return append(b, '>'), nil
	}
	return b, ErrBadTerm
}

// EscapeAttr escapes s for use as an attribute value.
func EscapeAttr(s string) string { return string(appendEscaped(nil, []byte(s), true)) }

func appendAttrs(b []byte, as etf.Term) ([]byte, error) {
	list, ok := as.(etf.List)
	if !ok {
		return b, ErrBadTerm
	}
	for _, a := range list {
		pair, ok := a.(etf.Tuple)
		if !ok || len(pair) != 2 {
			return b, ErrBadTerm
		}
		k, ok1 := pair[0].([]byte)
		v, ok2 := pair[1].([]byte)
		if !ok1 || !ok2 || !validName(k) {
			return b, ErrBadTerm
		}
		b = append(b, ' ')
		b = append(b, k...)
		b = append(b, "='"...)
		b = appendEscaped(b, v, true)
		b = append(b, '\'')
	}
	return b, nil
}

// validName guards the one place where term contents become markup: a
// name with markup characters in it would let a term rewrite the stream.
func validName(n []byte) bool {
	return len(n) > 0 && !strings.ContainsAny(string(n), "<>&'\"= \t\r\n/")
}

func appendEscaped(b []byte, s []byte, attr bool) []byte {
	for _, c := range s {
		switch {
		case c == '&':
			b = append(b, "&amp;"...)
		case c == '<':
			b = append(b, "&lt;"...)
		case c == '>':
			b = append(b, "&gt;"...)
		case attr && c == '\'':
			b = append(b, "&apos;"...)
		case attr && c == '"':
			b = append(b, "&quot;"...)
		default:
			b = append(b, c)
		}
	}
	return b
}
