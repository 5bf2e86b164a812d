package sidecar

import (
	"testing"

	"github.com/megaphone-im/megaphone/bosh"
)

// A BOSH request's report crosses the handoff socket whole; a payload too
// short to be one is refused, not half read.
func TestRIDEventPayload(t *testing.T) {
	for _, e := range []bosh.RIDEvent{
		{Kind: bosh.RIDSent, SID: "2d11b824fe140042d5d8cde548a74d9b2d07a1fc", RID: 1048544772},
		{Kind: bosh.RIDEntered, SID: "", RID: ^uint64(0)},
	} {
		if got, ok := parseRIDEvent(ridEventPayload(e)); !ok || got != e {
			t.Errorf("%+v came back as %+v (%v)", e, got, ok)
		}
	}
	if _, ok := parseRIDEvent([]byte{'S', 0, 0, 0}); ok {
		t.Error("a short payload was taken for a report")
	}
}
