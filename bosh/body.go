package bosh

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// NS is the namespace of a BOSH <body/> (XEP-0124).
const NS = "http://jabber.org/protocol/httpbind"

// maxDepth bounds element nesting in a request body. Stanzas nest a handful
// of levels; a deeper body is an attack on whoever parses it next.
const maxDepth = 64

// errBadBody is wrapped by every reason a body is refused.
var errBadBody = errors.New("bad BOSH body")

// bodyInfo is what the sidecar needs to know of a request body to route it.
type bodyInfo struct {
	SID       string // empty when the request opens a session
	Terminate bool   // type='terminate': the client ends its session
	RID       string // the request's rid, as written
}

// checkBody verifies, before anything reaches ejabberd, that b is one
// well-formed XML document whose root is a BOSH <body/>. It refuses DTDs
// (and so entity expansion), processing instructions other than the XML
// declaration, undefined entities and excessive nesting.
func checkBody(b []byte) (bodyInfo, error) {
	var info bodyInfo
	if len(bytes.TrimSpace(b)) == 0 {
		return info, fmt.Errorf("%w: empty", errBadBody)
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
			return info, fmt.Errorf("%w: %v", errBadBody, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if roots > 1 {
					return info, fmt.Errorf("%w: more than one root element", errBadBody)
				}
				if t.Name.Local != "body" || t.Name.Space != NS {
					return info, fmt.Errorf("%w: root is not <body xmlns='%s'/>", errBadBody, NS)
				}
				info.SID = attrValue(t, "sid")
				info.Terminate = attrValue(t, "type") == "terminate"
				info.RID = attrValue(t, "rid")
			}
			if depth++; depth > maxDepth {
				return info, fmt.Errorf("%w: nested deeper than %d", errBadBody, maxDepth)
			}
		case xml.EndElement:
			depth--
		case xml.Directive:
			return info, fmt.Errorf("%w: DTDs and directives are not allowed", errBadBody)
		case xml.ProcInst:
			if t.Target != "xml" {
				return info, fmt.Errorf("%w: processing instructions are not allowed", errBadBody)
			}
		case xml.CharData:
			if depth == 0 && len(bytes.TrimSpace(t)) > 0 {
				return info, fmt.Errorf("%w: text outside <body/>", errBadBody)
			}
		}
	}
	if roots == 0 {
		return info, fmt.Errorf("%w: no <body/> element", errBadBody)
	}
	return info, nil
}

// isEchoedRequest reports whether ejabberd's response to req is req itself
// handed back. ejabberd_bosh (checked in 23.01) does that when a client
// re-sends a rid that is held without an answer, as every client does when
// its connection drops mid long-poll (a sidecar restart, a flaky network):
// it parks the re-sent request *itself* as the holder, and when it later
// releases the holder with nothing new it answers with that request, so the
// client sees its own stanzas come back. When it has something new, it
// answers with the parked request's attributes around the new stanzas,
// which is a real answer. ejabberd never puts a rid on an answer it builds
// itself, so: a rid on the root, and the request's very children inside,
// is the echo.
//
// Only the root's start tag is read for the common answer; the full
// comparison runs for the rare one that carries a rid.
func isEchoedRequest(req, resp []byte) bool {
	if root, ok := rootElement(resp); !ok || !hasAttr(root, "rid") {
		return false
	}
	respKids, err := canonicalChildren(resp)
	if err != nil {
		return false
	}
	reqKids, err := canonicalChildren(req)
	return err == nil && reqKids == respKids
}

func hasAttr(se xml.StartElement, local string) bool {
	for _, a := range se.Attr {
		if a.Name.Space == "" && a.Name.Local == local {
			return true
		}
	}
	return false
}

func attrValue(se xml.StartElement, local string) string {
	for _, a := range se.Attr {
		if a.Name.Space == "" && a.Name.Local == local {
			return a.Value
		}
	}
	return ""
}

// responseRoot reads the attributes of a response's root <body/>: the sid
// of a session just opened, and whether ejabberd ended the session.
func responseRoot(resp []byte) (sid string, terminate bool) {
	root, _ := rootElement(resp)
	return attrValue(root, "sid"), attrValue(root, "type") == "terminate"
}

// boundJID returns the JID in ejabberd's answer to a resource binding,
// or "" if the answer is not one. Answers are looked at only until their
// session is bound, and most are rejected by the first bytes.Contains.
func boundJID(answer []byte) string {
	at := bytes.Index(answer, []byte(nsBind))
	if at < 0 {
		return ""
	}
	start := bytes.Index(answer[at:], []byte("<jid>"))
	if start < 0 {
		return ""
	}
	var jid struct {
		Text string `xml:",chardata"`
	}
	if err := xml.NewDecoder(bytes.NewReader(answer[at+start:])).Decode(&jid); err != nil {
		return ""
	}
	return jid.Text
}

// nsBind is resource binding's namespace (RFC 6120 §7).
const nsBind = "urn:ietf:params:xml:ns:xmpp-bind"

// rootElement reads a document's first start tag, and nothing more.
func rootElement(doc []byte) (xml.StartElement, bool) {
	d := xml.NewDecoder(bytes.NewReader(doc))
	for {
		tok, err := d.RawToken()
		if err != nil {
			return xml.StartElement{}, false
		}
		if se, ok := tok.(xml.StartElement); ok {
			return se, true
		}
	}
}

// canonicalChildren returns a canonical rendering of everything inside a
// document's root element: namespaces resolved, attributes sorted,
// namespace declarations and whitespace-only text dropped, so that the
// client's bytes and ejabberd's re-serialisation of them compare equal.
func canonicalChildren(doc []byte) (string, error) {
	d := xml.NewDecoder(bytes.NewReader(doc))
	var out strings.Builder
	depth := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			return out.String(), nil
		}
		if err != nil {
			return "", err
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth++; depth == 1 {
				continue
			}
			attrs := make([]string, 0, len(t.Attr))
			for _, a := range t.Attr {
				if a.Name.Space == "xmlns" || (a.Name.Space == "" && a.Name.Local == "xmlns") {
					continue
				}
				attrs = append(attrs, a.Name.Space+" "+a.Name.Local+"="+strconv.Quote(a.Value))
			}
			sort.Strings(attrs)
			fmt.Fprintf(&out, "<%s %s %s>", t.Name.Space, t.Name.Local, strings.Join(attrs, " "))
		case xml.EndElement:
			depth--
			if depth >= 1 {
				out.WriteString("</>")
			}
		case xml.CharData:
			if depth >= 1 && len(bytes.TrimSpace(t)) > 0 {
				out.WriteString(strconv.Quote(string(t)))
			}
		}
	}
}

// emptyBody is what ejabberd answers a held request with when a newer one
// releases it: nothing new for the client.
const emptyBody = "<body xmlns='" + NS + "'/>"
