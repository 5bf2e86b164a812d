package etf

import (
	"bytes"
	"math/big"
	"net/netip"
	"reflect"
	"testing"
)

// Bytes produced by term_to_binary/1 on OTP 25, so the decoder is checked
// against the real thing rather than against our own encoder.
var (
	erlBOSHResponse = []byte{131, 104, 7, 100, 0, 13, 98, 111, 115, 104, 95, 114, 101, 115, 112, 111, 110, 115, 101, 110, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255, 97, 7, 97, 200, 109, 0, 0, 0, 2, 79, 75, 108, 0, 0, 0, 1, 104, 2, 109, 0, 0, 0, 12, 67, 111, 110, 116, 101, 110, 116, 45, 84, 121, 112, 101, 109, 0, 0, 0, 8, 116, 101, 120, 116, 47, 120, 109, 108, 106, 109, 0, 0, 0, 7, 60, 98, 111, 100, 121, 47, 62}
	// #{a => 1, {x,y} => [1,2|3], "str" => -5000000000, f => 1.5, u => 'héllo'}
	erlMap = []byte{131, 116, 0, 0, 0, 5, 100, 0, 1, 97, 97, 1, 100, 0, 1, 102, 70, 63, 248, 0, 0, 0, 0, 0, 0, 100, 0, 1, 117, 100, 0, 5, 104, 233, 108, 108, 111, 104, 2, 100, 0, 1, 120, 100, 0, 1, 121, 108, 0, 0, 0, 2, 97, 1, 97, 2, 97, 3, 107, 0, 3, 115, 116, 114, 110, 5, 1, 0, 242, 5, 42, 1}
	// {self(), make_ref(), [], true}
	erlPidRef = []byte{131, 104, 4, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 90, 0, 3, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 0, 0, 2, 123, 176, 148, 12, 0, 2, 139, 252, 177, 227, 106, 100, 0, 4, 116, 114, 117, 101}
)

func TestDecodeErlangBOSHResponse(t *testing.T) {
	term, rest, err := Decode(erlBOSHResponse)
	if err != nil || len(rest) != 0 {
		t.Fatalf("decode: %v, %d bytes left", err, len(rest))
	}
	msg, err := ParseShimMessage(term)
	if err != nil {
		t.Fatal(err)
	}
	want := BOSHResponse{ConnID: 1<<64 - 1, ReqID: 7, Status: 200, Reason: "OK",
		Headers: []Header{{"Content-Type", "text/xml"}}, Body: []byte("<body/>")}
	if !reflect.DeepEqual(msg, want) {
		t.Fatalf("got %#v\nwant %#v", msg, want)
	}
}

func TestDecodeErlangMapAndSpecials(t *testing.T) {
	term, _, err := Decode(erlMap)
	if err != nil {
		t.Fatal(err)
	}
	m := term.(Map)
	if len(m) != 5 {
		t.Fatalf("map has %d entries, want 5 (tuple keys must survive)", len(m))
	}
	if v, _ := m.Get("u"); v != Atom("héllo") {
		t.Errorf("latin-1 atom decoded as %q", v)
	}
	if v, _ := m.Get("f"); v != 1.5 {
		t.Errorf("float decoded as %v", v)
	}
	for _, e := range m {
		if k, ok := e.Key.(Tuple); ok {
			want := ImproperList{Elems: []Term{int64(1), int64(2)}, Tail: int64(3)}
			if !reflect.DeepEqual(k, Tuple{Atom("x"), Atom("y")}) || !reflect.DeepEqual(e.Value, want) {
				t.Errorf("tuple key entry %#v", e)
			}
		}
		if k, ok := e.Key.(List); ok {
			if !reflect.DeepEqual(k, List{int64('s'), int64('t'), int64('r')}) || e.Value != int64(-5000000000) {
				t.Errorf("string key entry %#v", e)
			}
		}
	}

	term, _, err = Decode(erlPidRef)
	if err != nil {
		t.Fatal(err)
	}
	tup := term.(Tuple)
	if p := tup[0].(Pid); p.Node != "nonode@nohost" || p.ID != 9 {
		t.Errorf("pid %#v", p)
	}
	if r := tup[1].(Ref); len(r.IDs) != 3 {
		t.Errorf("ref %#v", r)
	}
	if tup[3] != true {
		t.Errorf("true decoded as %#v", tup[3])
	}
	// What we decode, we re-encode to the same bytes (modulo atom tags).
	again, err := Encode(Tuple{tup[0], tup[1], List{}, true})
	if err != nil {
		t.Fatal(err)
	}
	back, _, err := Decode(again)
	if err != nil || !reflect.DeepEqual(back, term) {
		t.Fatalf("round trip: %#v (%v)", back, err)
	}
}

func TestRoundTrip(t *testing.T) {
	huge, _ := new(big.Int).SetString("-123456789012345678901234567890", 10)
	cases := []Term{
		int64(0), int64(255), int64(256), int64(-1), int64(1 << 40), huge,
		Atom(""), Atom("megaphone"), Atom("ünï"), []byte{}, []byte("<body/>"),
		Tuple{}, List{}, List{int64(1), List{Atom("a")}},
		Map{{Key: Tuple{int64(1)}, Value: []byte("x")}},
		Pid{Node: "a@b", ID: 1, Serial: 2, Creation: 3},
		Ref{Node: "a@b", Creation: 9, IDs: []uint32{1, 2, 3}},
		Port{Node: "a@b", ID: 1 << 40, Creation: 7},
		BitBinary{Bytes: []byte{0xff}, Bits: 3},
		make(Tuple, 300),
	}
	for _, c := range cases {
		if tup, ok := c.(Tuple); ok && len(tup) == 300 {
			for i := range tup {
				tup[i] = int64(i)
			}
		}
		b, err := Encode(c)
		if err != nil {
			t.Fatalf("encode %#v: %v", c, err)
		}
		got, rest, err := Decode(b)
		if err != nil || len(rest) != 0 {
			t.Fatalf("decode %#v: %v", c, err)
		}
		if !reflect.DeepEqual(got, c) {
			t.Errorf("round trip %#v -> %#v", c, got)
		}
	}
}

func TestEncodeMatchesErlang(t *testing.T) {
	b, err := Encode(Tuple{Atom("bosh_response"), uint64(1<<64 - 1), 7, 200, "OK",
		List{Tuple{"Content-Type", "text/xml"}}, []byte("<body/>")})
	if err != nil {
		t.Fatal(err)
	}
	// Erlang writes the old latin-1 atom tag; we write the UTF-8 one. Both
	// decode to the same term on either side.
	got, _, _ := Decode(b)
	want, _, _ := Decode(erlBOSHResponse)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v want %#v", got, want)
	}
}

func TestPeerTerm(t *testing.T) {
	got := PeerTerm(netip.MustParseAddrPort("127.0.0.2:4567"))
	want := Tuple{Tuple{127, 0, 0, 2}, 4567}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("v4: %#v", got)
	}
	got = PeerTerm(netip.MustParseAddrPort("[::1]:80"))
	want = Tuple{Tuple{0, 0, 0, 0, 0, 0, 0, 1}, 80}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("v6: %#v", got)
	}
}

func TestHostileInput(t *testing.T) {
	cases := map[string][]byte{
		"empty":            {},
		"no version":       {104, 0},
		"huge list":        {131, 108, 0xff, 0xff, 0xff, 0xff},
		"huge binary":      {131, 109, 0x7f, 0xff, 0xff, 0xff, 1},
		"huge map":         {131, 116, 0xff, 0xff, 0xff, 0xff},
		"huge tuple":       {131, 105, 0xff, 0xff, 0xff, 0xff},
		"truncated atom":   {131, 100, 0, 10, 'a'},
		"fun":              {131, 117, 0, 0, 0, 0},
		"pid bad node":     {131, 88, 97, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		"ref zero ids":     {131, 90, 0, 0, 100, 0, 1, 'a', 0, 0, 0, 0},
		"deep":             append([]byte{131}, bytes.Repeat([]byte{104, 1}, MaxDepth+10)...),
		"list bad tail":    {131, 108, 0, 0, 0, 1, 97, 1},
		"compressed":       {131, 80, 0, 0, 0, 10, 1, 2},
		"float garbage":    append([]byte{131, 99}, bytes.Repeat([]byte{'x'}, 31)...),
		"big truncated":    {131, 110, 10, 0, 1},
		"string truncated": {131, 107, 0, 5, 'a'},
	}
	for name, b := range cases {
		if _, _, err := Decode(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

// FuzzDecode: hostile bytes from a compromised node must never panic the
// decoder, and whatever decodes must re-encode and decode to the same term.
func FuzzDecode(f *testing.F) {
	for _, seed := range [][]byte{erlBOSHResponse, erlMap, erlPidRef, {131, 106}} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		term, _, err := Decode(b)
		if err != nil {
			return
		}
		again, err := Encode(term)
		if err != nil {
			return // e.g. atoms longer than Erlang allows
		}
		if _, _, err := Decode(again); err != nil {
			t.Fatalf("re-encoded term does not decode: %v", err)
		}
		_, _ = ParseShimMessage(term)
	})
}
