package bosh

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
)

// NS is the namespace of a BOSH <body/> (XEP-0124).
const NS = "http://jabber.org/protocol/httpbind"

// maxDepth bounds element nesting in a request body. Stanzas nest a handful
// of levels; a deeper body is an attack on whoever parses it next.
const maxDepth = 64

// errBadBody is wrapped by every reason a body is refused.
var errBadBody = errors.New("bad BOSH body")

// checkBody verifies, before anything reaches ejabberd, that b is one
// well-formed XML document whose root is a BOSH <body/>. It refuses DTDs
// (and so entity expansion), processing instructions other than the XML
// declaration, undefined entities and excessive nesting.
func checkBody(b []byte) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return fmt.Errorf("%w: empty", errBadBody)
	}
	d := xml.NewDecoder(bytes.NewReader(b))
	d.Strict = true
	depth, roots := 0, 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", errBadBody, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if roots > 1 {
					return fmt.Errorf("%w: more than one root element", errBadBody)
				}
				if t.Name.Local != "body" || t.Name.Space != NS {
					return fmt.Errorf("%w: root is not <body xmlns='%s'/>", errBadBody, NS)
				}
			}
			if depth++; depth > maxDepth {
				return fmt.Errorf("%w: nested deeper than %d", errBadBody, maxDepth)
			}
		case xml.EndElement:
			depth--
		case xml.Directive:
			return fmt.Errorf("%w: DTDs and directives are not allowed", errBadBody)
		case xml.ProcInst:
			if t.Target != "xml" {
				return fmt.Errorf("%w: processing instructions are not allowed", errBadBody)
			}
		case xml.CharData:
			if depth == 0 && len(bytes.TrimSpace(t)) > 0 {
				return fmt.Errorf("%w: text outside <body/>", errBadBody)
			}
		}
	}
	if roots == 0 {
		return fmt.Errorf("%w: no <body/> element", errBadBody)
	}
	return nil
}
