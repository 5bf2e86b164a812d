package etf

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func TestFromSidecarWrapsFromTokenVersion(t *testing.T) {
	msg := BOSHCancel{ConnID: 1, ReqID: 2}.Term()
	token := []byte("0123456789abcdef")
	for _, v := range []int{1, 2} {
		if got := FromSidecar(v, nil, msg); !reflect.DeepEqual(got, msg) {
			t.Errorf("version %d: %v, want the bare message", v, got)
		}
	}
	want := Tuple{Atom("from_sidecar"), token, msg}
	if got := FromSidecar(3, token, msg); !reflect.DeepEqual(got, want) {
		t.Errorf("version 3: %v, want %v", got, want)
	}
}

func TestWelcomeCarriesItsToken(t *testing.T) {
	session := Pid{Node: "e@h", ID: 3}
	token := []byte("0123456789abcdef")
	m, err := ParseShimMessage(Tuple{atomWelcome, session, int64(3), Map{{Key: Atom("token"), Value: token}}})
	if err != nil {
		t.Fatal(err)
	}
	if w := m.(Welcome); !bytes.Equal(w.Token, token) || w.Version != 3 {
		t.Errorf("welcome %+v", w)
	}
	// A version 3 welcome without a token could only lead to messages the
	// session ignores: it is no welcome.
	for _, info := range []Map{{}, {{Key: Atom("token"), Value: Atom("t")}}, {{Key: Atom("token"), Value: []byte{}}}} {
		if _, err := ParseShimMessage(Tuple{atomWelcome, session, int64(3), info}); !errors.Is(err, ErrNotProtocol) {
			t.Errorf("welcome with %v: err %v", info, err)
		}
	}
	if _, err := ParseShimMessage(Tuple{atomWelcome, session, int64(2), Map{}}); err != nil {
		t.Errorf("version 2 welcome without token: %v", err)
	}
}
