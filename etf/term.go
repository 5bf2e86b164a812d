// Package etf holds the Erlang External Term Format: the Go types that stand
// for Erlang terms, their codec, and the bridge protocol's messages built from
// them (see protocol.go and docs/PROTOCOL.md).
//
// The codec is written here rather than borrowed from ergo because the sidecar
// decodes terms that cross a trust boundary: every length is checked against
// the bytes that remain before anything is allocated, nesting is bounded, and
// maps keep any key type (ergo's decoder drops maps with tuple keys).
package etf

import (
	"fmt"
	"math/big"
	"strings"
)

// Term is any Erlang term. The concrete Go types are:
//
//	Atom, int64, *big.Int, float64, []byte (binary), Tuple, List,
//	ImproperList, Map, Pid, Ref, Port, BitBinary.
//
// On encode, the conveniences int, uint64, uint32, int32, string (as a
// binary), bool (as an atom) and nil (as []) are accepted too.
type Term = any

// Atom is an Erlang atom. Decoded atoms never create anything on the
// Erlang side; encoding an Atom does, so only constants may become Atoms.
type Atom string

// Tuple is an Erlang tuple.
type Tuple []Term

// List is a proper Erlang list. An empty List encodes as [].
type List []Term

// ImproperList is a list whose tail is not [].
type ImproperList struct {
	Elems []Term
	Tail  Term
}

// MapEntry is one key/value pair of a Map.
type MapEntry struct {
	Key   Term
	Value Term
}

// Map is an Erlang map, kept as ordered pairs so that any key type survives.
type Map []MapEntry

// Get returns the value stored under an atom key.
func (m Map) Get(key Atom) (Term, bool) {
	for _, e := range m {
		if a, ok := e.Key.(Atom); ok && a == key {
			return e.Value, true
		}
	}
	return nil, false
}

// Pid is an Erlang process identifier.
type Pid struct {
	Node     Atom
	ID       uint32
	Serial   uint32
	Creation uint32
}

func (p Pid) String() string {
	return fmt.Sprintf("<%s.%d.%d>", p.Node, p.ID, p.Serial)
}

// Ref is an Erlang reference.
type Ref struct {
	Node     Atom
	Creation uint32
	IDs      []uint32
}

// Equal reports whether two references are the same reference.
func (r Ref) Equal(o Ref) bool {
	if r.Node != o.Node || r.Creation != o.Creation || len(r.IDs) != len(o.IDs) {
		return false
	}
	for i := range r.IDs {
		if r.IDs[i] != o.IDs[i] {
			return false
		}
	}
	return true
}

func (r Ref) String() string {
	parts := make([]string, len(r.IDs))
	for i, id := range r.IDs {
		parts[i] = fmt.Sprint(id)
	}
	return fmt.Sprintf("#Ref<%s.%s>", r.Node, strings.Join(parts, "."))
}

// Port is an Erlang port identifier.
type Port struct {
	Node     Atom
	ID       uint64
	Creation uint32
}

// BitBinary is a binary whose last byte holds only Bits significant bits.
type BitBinary struct {
	Bytes []byte
	Bits  uint8
}

// Int64 converts an integer term to int64.
func Int64(t Term) (int64, bool) {
	switch v := t.(type) {
	case int64:
		return v, true
	case *big.Int:
		if v.IsInt64() {
			return v.Int64(), true
		}
	}
	return 0, false
}

// Uint64 converts a non-negative integer term to uint64.
func Uint64(t Term) (uint64, bool) {
	switch v := t.(type) {
	case int64:
		if v >= 0 {
			return uint64(v), true
		}
	case *big.Int:
		if v.Sign() >= 0 && v.IsUint64() {
			return v.Uint64(), true
		}
	}
	return 0, false
}
