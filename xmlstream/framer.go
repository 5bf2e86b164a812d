package xmlstream

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/megaphone-im/megaphone/etf"
)

// Framer turns a client's XMPP stream into c2s events, fed with whatever
// the socket gave, split anywhere. It is the per-connection half of the
// parser, made small: a byte-level state machine finds where each
// top-level unit ends (the stream header's start tag, an <?xml?>
// declaration, one stanza, </stream:stream>), keeps only the bytes of the
// unit in progress, and hands each complete unit to the strict parse in
// one go. An idle stream between two units holds no buffer at all, where
// an encoding/xml Decoder on the socket keeps its state and a 4 KiB bufio
// for the life of the connection (measured in docs/EVENTLOOP.md).
//
// What the framer can see it refuses as the bytes arrive: a comment or a
// DTD (restricted-xml), text between stanzas (not-well-formed), a unit
// over the stanza limit or nested over the depth limit (policy-violation).
// Everything else (names, attributes, entities, end tags that do not
// match) is the parse's to judge, so the stream errors are those of the
// streaming parser; before it refuses, the framer lets the parse look at
// the unit so far, which names an earlier error the way the parser would.
type Framer struct {
	limits  Limits
	started bool // a stream header was seen: later start tags at depth 0 are stanzas

	state  uint8
	quote  byte  // the quote that ends the attribute value being read
	sub    uint8 // progress through a multi-byte sequence (see the states)
	stream bool  // the depth-0 start tag's name so far is a prefix of stream:stream
	slash  bool  // the last byte of the tag was '/'
	depth  int   // open elements of the unit in progress
	inUnit bool
	size   int64 // bytes of the unit in progress, or of the whitespace run between units
	buf    []byte
}

// The framer's states. sub counts: the bytes of "stream:stream" matched
// in sStartName, of "CDATA[" in sCDATAOpen, the ']' seen in sCDATA, a '?'
// seen in sPI.
const (
	sText uint8 = iota
	sLt
	sStartName
	sStartTag
	sQuote
	sEndTag
	sPI
	sBang
	sBangDash
	sCDATAOpen
	sCDATA
)

const streamName = "stream:stream"

// NewFramer returns a framer at the start of a stream.
func NewFramer(limits Limits) *Framer {
	return &Framer{limits: limits.withDefaults()}
}

func (l Limits) withDefaults() Limits {
	if l.MaxStanzaBytes <= 0 {
		l.MaxStanzaBytes = DefaultMaxStanzaBytes
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = 64
	}
	return l
}

// SetMaxStanzaBytes changes the stanza limit (ejabberd tells us its own).
func (f *Framer) SetMaxStanzaBytes(n int64) {
	if n > 0 {
		f.limits.MaxStanzaBytes = n
	}
}

// Resume puts the framer inside a stream that is already open (a stream
// that moved from another process): stanzas need no header first.
func (f *Framer) Resume() { f.started = true }

// Pending returns a copy of the bytes of the unit in progress: what a
// takeover must hand the next reader, which feeds them first.
func (f *Framer) Pending() []byte { return bytes.Clone(f.buf) }

// Idle reports whether no unit is in progress (no buffer is held).
func (f *Framer) Idle() bool { return !f.inUnit }

// Release gives back the buffer of a unit in progress; the stream ends.
func (f *Framer) Release() {
	putUnitBuf(f.buf)
	f.buf, f.inUnit, f.size = nil, false, 0
}

// Feed frames p and calls emit with each event of each unit it completes,
// in order. It returns the first error: emit's, or a broken stream's
// (wrapping one of the Err* stream conditions); the framer is then
// unusable. p is not kept.
func (f *Framer) Feed(p []byte, emit func(etf.Term) error) error {
	start := 0 // where the unit in progress begins in p, when it begins in p
	if f.inUnit {
		start = -1
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		if f.inUnit {
			f.size++
			if f.size > f.limits.MaxStanzaBytes {
				return f.refuse(p, start, i, fmt.Errorf("%w: stanza over %d bytes", ErrPolicyViolation, f.limits.MaxStanzaBytes))
			}
		}
		done, err := f.step(c)
		if err != nil {
			return f.refuse(p, start, i, err)
		}
		if f.state == sLt && !f.inUnit {
			// A '<' between units: a unit starts (if it turns out to be
			// CDATA between stanzas, it is dropped again).
			f.inUnit, f.size, start = true, 1, i
		}
		if f.state == sCDATA && f.depth == 0 && f.inUnit {
			f.Release() // text between stanzas, not a unit: checked byte by byte
		}
		if done {
			var unit []byte
			if start < 0 {
				f.buf = append(f.buf, p[:i+1]...)
				unit = f.buf
			} else {
				unit = p[start : i+1]
			}
			err := f.parse(unit, emit)
			f.Release()
			if err != nil {
				return err
			}
			start = 0
		}
	}
	if f.inUnit {
		switch {
		case start < 0:
			f.buf = append(f.buf, p...)
		default:
			f.buf = append(getUnitBuf(), p[start:]...)
		}
	}
	return nil
}

// End reports what the end of the input means: nil between units, and an
// error for a stream that ended inside one.
func (f *Framer) End() error {
	if !f.inUnit {
		if f.state != sText {
			return fmt.Errorf("%w: stream ended inside CDATA", ErrNotWellFormed)
		}
		return nil
	}
	defer f.Release()
	if err := f.confirm(f.buf); err != nil {
		return err
	}
	return fmt.Errorf("%w: stream ended inside a stanza", ErrNotWellFormed)
}

// step advances the state machine by one byte; done says a unit ends
// with it.
func (f *Framer) step(c byte) (done bool, err error) {
	switch f.state {
	case sText:
		switch {
		case c == '<':
			f.state = sLt
		case f.depth > 0:
		case isSpace(c):
			if f.size++; f.size > f.limits.MaxStanzaBytes {
				return false, fmt.Errorf("%w: whitespace over %d bytes", ErrPolicyViolation, f.limits.MaxStanzaBytes)
			}
		default:
			return false, fmt.Errorf("%w: text between stanzas", ErrNotWellFormed)
		}
	case sLt:
		switch c {
		case '?':
			f.state, f.sub = sPI, 0
		case '!':
			f.state = sBang
		case '/':
			f.state = sEndTag
		default:
			f.state, f.slash, f.stream, f.sub = sStartName, false, f.depth == 0, 0
			return f.step(c) // the first byte of the name
		}
	case sStartName, sStartTag:
		switch {
		case c == '>':
			return f.startTagEnds()
		case f.state == sStartName && !isSpace(c) && c != '/':
			if f.stream {
				f.stream = int(f.sub) < len(streamName) && c == streamName[f.sub]
				f.sub++
			}
		case c == '\'' || c == '"':
			f.state, f.quote, f.slash = sQuote, c, false
		default:
			f.state, f.slash = sStartTag, c == '/'
		}
	case sQuote:
		if c == f.quote {
			f.state = sStartTag
		}
	case sEndTag:
		if c == '>' {
			f.state = sText
			if f.depth <= 1 {
				f.depth = 0
				return true, nil
			}
			f.depth--
		}
	case sPI:
		switch {
		case c == '>' && f.sub == 1:
			f.state = sText
			return f.depth == 0, nil // a declaration between units is a unit of its own
		case c == '?':
			f.sub = 1
		default:
			f.sub = 0
		}
	case sBang:
		switch c {
		case '-':
			f.state = sBangDash
		case '[':
			f.state, f.sub = sCDATAOpen, 0
		default:
			return false, fmt.Errorf("%w: DTD or directive", ErrRestrictedXML)
		}
	case sBangDash:
		if c == '-' {
			return false, fmt.Errorf("%w: comment", ErrRestrictedXML)
		}
		return false, fmt.Errorf("%w: invalid <!- sequence", ErrNotWellFormed)
	case sCDATAOpen:
		if c != "CDATA["[f.sub] {
			return false, fmt.Errorf("%w: invalid <![ sequence", ErrNotWellFormed)
		}
		if f.sub++; f.sub == 6 {
			f.state, f.sub = sCDATA, 0
		}
	case sCDATA:
		// f.sub counts the ']' that may begin "]]>"; any other byte, and
		// a ']' that turns out not to, is character data, which between
		// stanzas may only be whitespace.
		var data bool
		switch {
		case c == '>' && f.sub == 2:
			f.state = sText
		case c == ']' && f.sub < 2:
			f.sub++
		case c == ']':
			data = true // "]]]": the first one is data
		default:
			data = f.sub > 0 || !isSpace(c)
			f.sub = 0
		}
		if data && f.depth == 0 {
			return false, fmt.Errorf("%w: text between stanzas", ErrNotWellFormed)
		}
	}
	return false, nil
}

// startTagEnds handles the '>' of a start tag.
func (f *Framer) startTagEnds() (done bool, err error) {
	f.state = sText
	if f.depth == 0 {
		if f.stream && int(f.sub) == len(streamName) {
			return true, nil // a stream header (or a restart): a unit of its own
		}
		if !f.started {
			return false, fmt.Errorf("%w: expected a stream header", ErrNotWellFormed)
		}
	}
	if f.depth >= f.limits.MaxDepth {
		return false, fmt.Errorf("%w: nested deeper than %d", ErrPolicyViolation, f.limits.MaxDepth)
	}
	if f.slash {
		return f.depth == 0, nil // <stanza/>: done at depth 0
	}
	f.depth++
	return false, nil
}

// refuse turns what the framer saw into the stream's error. The parse
// looks at the unit up to and including p[i] first: an error it finds
// there (a bad name before a too-deep element, say) is the one the
// streaming parser would have reported.
func (f *Framer) refuse(p []byte, start, i int, seen error) error {
	var unit []byte
	if f.inUnit {
		if start < 0 {
			unit = append(f.buf, p[:i+1]...)
		} else {
			unit = p[start : i+1]
		}
	}
	defer f.Release()
	if err := f.confirm(unit); err != nil {
		return err
	}
	return seen
}

// confirm parses an incomplete unit and returns the error it holds before
// its end, if any.
func (f *Framer) confirm(unit []byte) error {
	if len(unit) == 0 {
		return nil
	}
	err := f.parse(unit, func(etf.Term) error { return nil })
	var se *xml.SyntaxError
	if err == nil || errors.Is(err, io.ErrUnexpectedEOF) || (errors.As(err, &se) && se.Msg == "unexpected EOF") {
		return nil
	}
	if errors.Is(err, errUnitEnded) {
		return nil
	}
	return err
}

// parse runs the strict parser over one unit.
func (f *Framer) parse(unit []byte, emit func(etf.Term) error) error {
	p := newUnitParser(unit, f.started, f.limits)
	for {
		ev, err := p.Next()
		if err == io.EOF {
			f.started = p.started
			return nil
		}
		if err != nil {
			return err
		}
		if err := emit(ev); err != nil {
			return err
		}
	}
}

func isSpace(c byte) bool { return c == ' ' || c == '\n' || c == '\r' || c == '\t' }

// Unit buffers come from a pool: most stanzas fit in 4 KiB, and a buffer
// goes back as soon as its unit is parsed, so idle streams share them.
const unitBufSize = 4 << 10

var unitBufs = sync.Pool{New: func() any { b := make([]byte, 0, unitBufSize); return &b }}

func getUnitBuf() []byte { return (*unitBufs.Get().(*[]byte))[:0] }

func putUnitBuf(b []byte) {
	if cap(b) == unitBufSize { // grown ones go to the collector
		b = b[:0]
		unitBufs.Put(&b)
	}
}
