package etf

import (
	"errors"
	"testing"
)

// Every message the shim sends, as seeds the fuzzer mutates into the
// hostile terms a compromised node could send instead.
var shimMessageSeeds = []Term{
	Tuple{Atom("bosh_response"), uint64(1<<64 - 1), 7, 200, "OK", List{Tuple{"Content-Type", "text/xml"}}, []byte("<body/>")},
	Tuple{Atom("c2s_out"), 1, Tuple{Atom("xmlstreamelement"), Tuple{Atom("xmlel"), "message", List{}, List{}}}},
	Tuple{Atom("c2s_close"), 1},
	Tuple{Atom("c2s_shaper"), 1, 50000},
	Tuple{Atom("c2s_shaper"), 1, Atom("none")},
	Tuple{Atom("c2s_started"), 1, Pid{Node: "e@h", ID: 1, Creation: 2}, Map{{Key: Atom("max_stanza_size"), Value: 65536}}},
	Tuple{Atom("c2s_started"), 1, Pid{Node: "e@h", ID: 1, Creation: 2}, Map{{Key: Atom("max_stanza_size"), Value: Atom("infinity")}}},
	Tuple{Atom("c2s_refused"), 1, "no"},
	Tuple{Atom("megaphone_welcome"), Pid{Node: "e@h", ID: 3}, 1, Map{{Key: Atom("node"), Value: Atom("e@h")}, {Key: Atom("ejabberd"), Value: "23.01"}}},
	Tuple{Atom("megaphone_welcome"), Pid{Node: "e@h", ID: 3}, int64(3), Map{{Key: Atom("token"), Value: []byte("0123456789abcdef")}}},
	Tuple{Atom("megaphone_refused"), "no common version", List{2, 3}},
	Tuple{Atom("megaphone_control"), Pid{Node: "e@h", ID: 3}, Ref{Node: "e@h", IDs: []uint32{1, 2, 3}}, Atom("status")},
	Tuple{Atom("megaphone_control"), Pid{Node: "e@h", ID: 3}, Ref{Node: "e@h", IDs: []uint32{1, 2, 3}}, Tuple{Atom("kick"), 7}},
	Tuple{Atom("DOWN"), Ref{Node: "e@h", IDs: []uint32{1, 2, 3}}, Atom("process"), Pid{Node: "e@h", ID: 3}, Atom("noconnection")},
}

// FuzzShimMessage: whatever term a compromised node sends, ParseShimMessage
// returns a protocol message whose fields are in range, or an error; it
// never panics.
func FuzzShimMessage(f *testing.F) {
	for _, m := range shimMessageSeeds {
		b, err := Encode(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		term, _, err := Decode(b)
		if err != nil {
			return
		}
		msg, err := ParseShimMessage(term)
		if err != nil {
			if !errors.Is(err, ErrNotProtocol) {
				t.Fatalf("error outside ErrNotProtocol: %v", err)
			}
			return
		}
		if msg == nil {
			t.Fatal("nil message without an error")
		}
		// Negative stanza limits and shaper rates get through, and mean
		// "none" to their users (sockets), as 0 does.
		if r, ok := msg.(BOSHResponse); ok && (r.Status < 100 || r.Status > 999) {
			// The HTTP front writes Status as it is: net/http panics on
			// codes outside 100..999.
			t.Fatalf("status %d accepted", r.Status)
		}
	})
}
