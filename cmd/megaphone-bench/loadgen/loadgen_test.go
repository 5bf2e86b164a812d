package loadgen

import (
	"strings"
	"testing"
)

// A stanza may arrive split anywhere across reads.
func TestBodiesAcrossReads(t *testing.T) {
	var got []string
	collect := func(b string) { got = append(got, b) }
	rest := bodies("<message><body>s:1</body></message><message><bo", collect)
	rest = bodies(rest+"dy>s:2</bo", collect)
	rest = bodies(rest+"dy></message>", collect)
	if strings.Join(got, ",") != "s:1,s:2" {
		t.Fatalf("bodies %q", got)
	}
	if len(rest) > len("<body>") {
		t.Fatalf("kept %q", rest)
	}
}
