package etf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"unicode/utf8"
)

// MaxDepth bounds how deeply terms may nest when decoding. The bridge
// protocol nests a few levels; XML elements from ejabberd nest as deep as the
// stanza, which the edge already bounds far below this.
const MaxDepth = 512

// ErrTruncated reports a term that ends before its declared size.
var ErrTruncated = errors.New("etf: truncated term")

// Decode decodes one term that starts with the version byte, and returns the
// bytes after it.
func Decode(b []byte) (Term, []byte, error) {
	if len(b) == 0 {
		return nil, nil, ErrTruncated
	}
	if b[0] != versionTag {
		return nil, nil, fmt.Errorf("etf: bad version byte %d", b[0])
	}
	d := decoder{buf: b[1:]}
	t, err := d.term(0)
	if err != nil {
		return nil, nil, err
	}
	return t, d.buf, nil
}

type decoder struct {
	buf []byte
}

func (d *decoder) take(n int) ([]byte, error) {
	if n < 0 || n > len(d.buf) {
		return nil, ErrTruncated
	}
	p := d.buf[:n:n]
	d.buf = d.buf[n:]
	return p, nil
}

func (d *decoder) u8() (byte, error) {
	p, err := d.take(1)
	if err != nil {
		return 0, err
	}
	return p[0], nil
}

func (d *decoder) u16() (int, error) {
	p, err := d.take(2)
	if err != nil {
		return 0, err
	}
	return int(binary.BigEndian.Uint16(p)), nil
}

func (d *decoder) u32() (uint32, error) {
	p, err := d.take(4)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(p), nil
}

// count reads a 32-bit element count and rejects counts that the remaining
// input cannot possibly hold (each element takes at least minSize bytes), so
// that a hostile length never makes us allocate.
func (d *decoder) count(minSize int) (int, error) {
	n, err := d.u32()
	if err != nil {
		return 0, err
	}
	if uint64(n)*uint64(minSize) > uint64(len(d.buf)) {
		return 0, ErrTruncated
	}
	return int(n), nil
}

func (d *decoder) term(depth int) (Term, error) {
	if depth > MaxDepth {
		return nil, errors.New("etf: term nested too deeply")
	}
	tag, err := d.u8()
	if err != nil {
		return nil, err
	}
	switch tag {
	case tagSmallInteger:
		v, err := d.u8()
		return int64(v), err
	case tagInteger:
		v, err := d.u32()
		return int64(int32(v)), err
	case tagNewFloat:
		p, err := d.take(8)
		if err != nil {
			return nil, err
		}
		return math.Float64frombits(binary.BigEndian.Uint64(p)), nil
	case tagFloat:
		p, err := d.take(31)
		if err != nil {
			return nil, err
		}
		end := 0
		for end < len(p) && p[end] != 0 {
			end++
		}
		f, err := strconv.ParseFloat(string(p[:end]), 64)
		if err != nil {
			return nil, fmt.Errorf("etf: bad float: %w", err)
		}
		return f, nil
	case tagAtom, tagAtomUTF8:
		n, err := d.u16()
		if err != nil {
			return nil, err
		}
		return d.atomBody(n)
	case tagSmallAtom, tagSmallAtomUTF8:
		n, err := d.u8()
		if err != nil {
			return nil, err
		}
		return d.atomBody(int(n))
	case tagSmallTuple:
		n, err := d.u8()
		if err != nil {
			return nil, err
		}
		return d.terms(int(n), depth)
	case tagLargeTuple:
		n, err := d.count(1)
		if err != nil {
			return nil, err
		}
		return d.terms(n, depth)
	case tagNil:
		return List{}, nil
	case tagString:
		n, err := d.u16()
		if err != nil {
			return nil, err
		}
		p, err := d.take(n)
		if err != nil {
			return nil, err
		}
		l := make(List, n)
		for i, c := range p {
			l[i] = int64(c)
		}
		return l, nil
	case tagList:
		n, err := d.count(1)
		if err != nil {
			return nil, err
		}
		elems, err := d.terms(n, depth)
		if err != nil {
			return nil, err
		}
		tail, err := d.term(depth + 1)
		if err != nil {
			return nil, err
		}
		if l, ok := tail.(List); ok && len(l) == 0 {
			return List(elems), nil
		}
		return ImproperList{Elems: elems, Tail: tail}, nil
	case tagBinary:
		n, err := d.count(1)
		if err != nil {
			return nil, err
		}
		p, err := d.take(n)
		return p, err
	case tagBitBinary:
		n, err := d.count(1)
		if err != nil {
			return nil, err
		}
		bits, err := d.u8()
		if err != nil {
			return nil, err
		}
		p, err := d.take(n)
		return BitBinary{Bytes: p, Bits: bits}, err
	case tagSmallBig:
		n, err := d.u8()
		if err != nil {
			return nil, err
		}
		return d.bigBody(int(n))
	case tagLargeBig:
		n, err := d.count(1)
		if err != nil {
			return nil, err
		}
		return d.bigBody(n)
	case tagMap:
		n, err := d.count(2)
		if err != nil {
			return nil, err
		}
		m := make(Map, n)
		for i := range m {
			if m[i].Key, err = d.term(depth + 1); err != nil {
				return nil, err
			}
			if m[i].Value, err = d.term(depth + 1); err != nil {
				return nil, err
			}
		}
		return m, nil
	case tagPid, tagNewPid:
		node, err := d.nodeAtom(depth)
		if err != nil {
			return nil, err
		}
		id, err := d.u32()
		if err != nil {
			return nil, err
		}
		serial, err := d.u32()
		if err != nil {
			return nil, err
		}
		creation, err := d.creation(tag == tagNewPid)
		return Pid{Node: node, ID: id, Serial: serial, Creation: creation}, err
	case tagPort, tagNewPort, tagV4Port:
		node, err := d.nodeAtom(depth)
		if err != nil {
			return nil, err
		}
		var id uint64
		if tag == tagV4Port {
			p, err := d.take(8)
			if err != nil {
				return nil, err
			}
			id = binary.BigEndian.Uint64(p)
		} else {
			v, err := d.u32()
			if err != nil {
				return nil, err
			}
			id = uint64(v)
		}
		creation, err := d.creation(tag != tagPort)
		return Port{Node: node, ID: id, Creation: creation}, err
	case tagNewReference, tagNewerReference:
		n, err := d.u16()
		if err != nil {
			return nil, err
		}
		if n == 0 || n > 5 {
			return nil, fmt.Errorf("etf: reference with %d ids", n)
		}
		node, err := d.nodeAtom(depth)
		if err != nil {
			return nil, err
		}
		creation, err := d.creation(tag == tagNewerReference)
		if err != nil {
			return nil, err
		}
		ids := make([]uint32, n)
		for i := range ids {
			if ids[i], err = d.u32(); err != nil {
				return nil, err
			}
		}
		return Ref{Node: node, Creation: creation, IDs: ids}, nil
	case tagReference:
		node, err := d.nodeAtom(depth)
		if err != nil {
			return nil, err
		}
		id, err := d.u32()
		if err != nil {
			return nil, err
		}
		creation, err := d.creation(false)
		return Ref{Node: node, Creation: creation, IDs: []uint32{id}}, err
	}
	// Funs, exports and compressed terms never occur in the bridge
	// protocol; refusing them keeps hostile input from reaching code paths
	// nobody needs.
	return nil, fmt.Errorf("etf: unsupported tag %d", tag)
}

func (d *decoder) terms(n, depth int) (Tuple, error) {
	// Each element takes at least one byte: reject impossible counts early.
	if n > len(d.buf) {
		return nil, ErrTruncated
	}
	ts := make(Tuple, n)
	var err error
	for i := range ts {
		if ts[i], err = d.term(depth + 1); err != nil {
			return nil, err
		}
	}
	return ts, nil
}

func (d *decoder) atomBody(n int) (Term, error) {
	p, err := d.take(n)
	if err != nil {
		return nil, err
	}
	if !utf8.Valid(p) {
		// Latin-1 atoms from old peers: widen each byte to its code point.
		r := make([]rune, len(p))
		for i, c := range p {
			r[i] = rune(c)
		}
		return Atom(string(r)), nil
	}
	switch string(p) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return Atom(p), nil
}

func (d *decoder) nodeAtom(depth int) (Atom, error) {
	t, err := d.term(depth + 1)
	if err != nil {
		return "", err
	}
	a, ok := t.(Atom)
	if !ok {
		return "", errors.New("etf: node name is not an atom")
	}
	return a, nil
}

func (d *decoder) creation(wide bool) (uint32, error) {
	if wide {
		return d.u32()
	}
	c, err := d.u8()
	return uint32(c), err
}

func (d *decoder) bigBody(n int) (Term, error) {
	sign, err := d.u8()
	if err != nil {
		return nil, err
	}
	p, err := d.take(n)
	if err != nil {
		return nil, err
	}
	be := make([]byte, n)
	for i, c := range p {
		be[n-1-i] = c
	}
	v := new(big.Int).SetBytes(be)
	if sign != 0 {
		v.Neg(v)
	}
	if v.IsInt64() {
		return v.Int64(), nil
	}
	return v, nil
}
