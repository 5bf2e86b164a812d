// Package xmlstream frames and parses an XMPP client stream in the sidecar,
// and writes ejabberd's answers back as XML, so that ejabberd never parses
// a byte of client XML: c2s gets ready-made elements (element mode).
//
// Measured (../shared/DESIGN.md): a c2s that parses its own bytes costs
// ~17.6 KB at best, one handed elements ~5 KB. This package is where that
// saving is made.
package xmlstream

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"

	"github.com/megaphone-im/megaphone/etf"
)

// Stream errors (RFC 6120 §4.9.3) a parse failure maps to.
var (
	ErrNotWellFormed   = errors.New("not-well-formed")
	ErrRestrictedXML   = errors.New("restricted-xml")
	ErrPolicyViolation = errors.New("policy-violation")
)

// Limits bound what one client may send.
type Limits struct {
	// MaxStanzaBytes bounds one top-level element (ejabberd's
	// max_stanza_size); 0 means 64 KiB.
	MaxStanzaBytes int64
	// MaxDepth bounds element nesting inside a stanza; 0 means 64.
	MaxDepth int
}

// Parser turns a client's XMPP stream into the events ejabberd's c2s takes:
// {xmlstreamstart, Name, Attrs}, {xmlel, Name, Attrs, Children} per
// stanza, and {xmlstreamend, Name}. Names keep their prefixes as written
// ("stream:stream"), as fast_xml would give them.
type Parser struct {
	dec    *xml.Decoder
	src    *countingReader
	limits Limits

	started     bool
	stack       []*etf.Tuple // open elements of the current stanza
	names       []string     // their names, to check end tags
	stanzaStart int64        // input offset where the current stanza (or header) began
}

// DefaultMaxStanzaBytes is the stanza limit when none is given.
const DefaultMaxStanzaBytes = 64 << 10

// NewParser reads a stream from r.
func NewParser(r io.Reader, limits Limits) *Parser {
	src := &countingReader{r: r}
	p := &Parser{src: src, limits: limits.withDefaults()}
	p.dec = xml.NewDecoder(src)
	p.dec.Strict = true
	return p
}

// newUnitParser parses one complete unit the Framer found, in memory:
// encoding/xml reads a *bytes.Reader (an io.ByteReader) directly, with no
// 4 KiB bufio of its own, and the unit's length is bounded already.
func newUnitParser(unit []byte, started bool, limits Limits) *Parser {
	p := &Parser{limits: limits, started: started}
	p.dec = xml.NewDecoder(bytes.NewReader(unit))
	p.dec.Strict = true
	return p
}

// Offset is how many bytes of the stream the parser has consumed.
func (p *Parser) Offset() int64 { return p.dec.InputOffset() }

// SetMaxStanzaBytes changes the stanza limit (ejabberd tells us its own).
func (p *Parser) SetMaxStanzaBytes(n int64) {
	if n > 0 {
		p.limits.MaxStanzaBytes = n
	}
}

// Next returns the next stream event. At the end of the input it returns
// io.EOF; a broken stream gives an error wrapping one of the Err* stream
// conditions.
func (p *Parser) Next() (etf.Term, error) {
	for {
		// Everything from the end of the last stanza counts: the next
		// stanza's own start tag, a stream header, whitespace. A start tag
		// is one token, so counting from inside the stanza would let one
		// huge tag (or header) through whole.
		if len(p.stack) == 0 {
			p.stanzaStart = p.dec.InputOffset()
		}
		// A stanza that keeps growing is cut before it is buffered whole:
		// the reader refuses to run far past the limit.
		if p.src != nil {
			p.src.limit = p.stanzaStart + p.limits.MaxStanzaBytes + 8192 // + the decoder's read-ahead
		}
		tok, err := p.dec.RawToken()
		if err != nil {
			switch {
			case errors.Is(err, errOverLimit):
				return nil, fmt.Errorf("%w: stanza over %d bytes", ErrPolicyViolation, p.limits.MaxStanzaBytes)
			case err == io.EOF && len(p.stack) == 0:
				return nil, io.EOF
			case err == io.EOF:
				return nil, fmt.Errorf("%w: %w", ErrNotWellFormed, errUnitEnded)
			case p.src != nil && p.src.err != nil && errors.Is(err, p.src.err):
				return nil, err // the connection failed, not the XML
			}
			// Syntax errors, and the decoder's plain ones (an XML
			// declaration with an unknown version or encoding).
			return nil, fmt.Errorf("%w: %w", ErrNotWellFormed, err)
		}
		if p.dec.InputOffset()-p.stanzaStart > p.limits.MaxStanzaBytes {
			return nil, fmt.Errorf("%w: stanza over %d bytes", ErrPolicyViolation, p.limits.MaxStanzaBytes)
		}
		ev, err := p.handle(tok)
		if err != nil || ev != nil {
			return ev, err
		}
	}
}

func (p *Parser) handle(tok xml.Token) (etf.Term, error) {
	switch t := tok.(type) {
	case xml.StartElement:
		name := qname(t.Name)
		if len(p.stack) == 0 && (name == "stream:stream" || !p.started) {
			if name != "stream:stream" {
				return nil, fmt.Errorf("%w: expected a stream header, got <%s>", ErrNotWellFormed, name)
			}
			// The opening header, or a restart after SASL (the client
			// opens a new stream without closing the old one).
			p.started = true
			return etf.Tuple{etf.Atom("xmlstreamstart"), []byte(name), attrs(t.Attr)}, nil
		}
		if len(p.stack) >= p.limits.MaxDepth {
			return nil, fmt.Errorf("%w: nested deeper than %d", ErrPolicyViolation, p.limits.MaxDepth)
		}
		el := etf.Tuple{etf.Atom("xmlel"), []byte(name), attrs(t.Attr), etf.List{}}
		p.stack = append(p.stack, &el)
		p.names = append(p.names, name)
	case xml.EndElement:
		name := qname(t.Name)
		if len(p.stack) == 0 {
			if name == "stream:stream" && p.started {
				return etf.Tuple{etf.Atom("xmlstreamend"), []byte(name)}, nil
			}
			return nil, fmt.Errorf("%w: unexpected </%s>", ErrNotWellFormed, name)
		}
		top := len(p.stack) - 1
		if p.names[top] != name {
			return nil, fmt.Errorf("%w: </%s> closes <%s>", ErrNotWellFormed, name, p.names[top])
		}
		el := p.stack[top]
		p.stack, p.names = p.stack[:top], p.names[:top]
		if top == 0 {
			return *el, nil
		}
		parent := p.stack[top-1]
		(*parent)[3] = append((*parent)[3].(etf.List), *el)
	case xml.CharData:
		if len(p.stack) == 0 {
			if len(bytes.TrimSpace(t)) > 0 {
				return nil, fmt.Errorf("%w: text between stanzas", ErrNotWellFormed)
			}
			return nil, nil // whitespace keepalives
		}
		if len(t) == 0 {
			// An empty CDATA section: no character data, and an empty
			// xmlcdata child would not survive being written and read
			// again (it writes as nothing).
			return nil, nil
		}
		parent := p.stack[len(p.stack)-1]
		(*parent)[3] = append((*parent)[3].(etf.List), etf.Tuple{etf.Atom("xmlcdata"), bytes.Clone(t)})
	case xml.ProcInst:
		if t.Target == "xml" && len(p.stack) == 0 {
			// The XML declaration, before the first header or a restarted
			// one (clients send it again after SASL).
			return nil, nil
		}
		return nil, fmt.Errorf("%w: processing instruction", ErrRestrictedXML)
	case xml.Comment:
		return nil, fmt.Errorf("%w: comment", ErrRestrictedXML)
	case xml.Directive:
		// DTDs, and with them entity expansion, are refused outright.
		return nil, fmt.Errorf("%w: DTD or directive", ErrRestrictedXML)
	}
	return nil, nil
}

func qname(n xml.Name) string {
	if n.Space == "" {
		return n.Local
	}
	return n.Space + ":" + n.Local
}

func attrs(as []xml.Attr) etf.List {
	l := make(etf.List, len(as))
	for i, a := range as {
		l[i] = etf.Tuple{[]byte(qname(a.Name)), []byte(a.Value)}
	}
	return l
}

var (
	errOverLimit = errors.New("over the stanza limit")
	errUnitEnded = errors.New("stream ended inside a stanza")
)

// countingReader counts what the decoder has read and, while limit is
// set, refuses to read past it.
type countingReader struct {
	r     io.Reader
	n     int64
	limit int64
	err   error // the last error of r, to tell it from bad XML
}

func (c *countingReader) Read(b []byte) (int, error) {
	if c.limit > 0 {
		room := c.limit - c.n
		if room <= 0 {
			return 0, errOverLimit
		}
		if int64(len(b)) > room {
			b = b[:room]
		}
	}
	n, err := c.r.Read(b)
	c.n += int64(n)
	if err != nil {
		c.err = err
	}
	return n, err
}

// ParseElement parses one complete element, as a WebSocket message carries
// it (RFC 7395: one stanza, or <open/>/<close/>, per message), with the
// same rules and limits as a stream.
func ParseElement(b []byte, limits Limits) (etf.Term, error) {
	if limits.MaxStanzaBytes > 0 && int64(len(b)) > limits.MaxStanzaBytes {
		return nil, fmt.Errorf("%w: message over %d bytes", ErrPolicyViolation, limits.MaxStanzaBytes)
	}
	p := newUnitParser(b, true, limits.withDefaults()) // started: no stream header around a framed element
	el, err := p.Next()
	if err == io.EOF {
		return nil, fmt.Errorf("%w: empty message", ErrNotWellFormed)
	}
	if err != nil {
		return nil, err
	}
	if t, ok := el.(etf.Tuple); !ok || t[0] != etf.Atom("xmlel") {
		return nil, fmt.Errorf("%w: a message must hold one element", ErrNotWellFormed)
	}
	if _, err := p.Next(); err != io.EOF {
		return nil, fmt.Errorf("%w: more than one element in a message", ErrNotWellFormed)
	}
	return el, nil
}
