package etf

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/big"
)

// Tags of the external term format (erts/emulator/beam/external.h).
const (
	versionTag        = 131
	tagNewFloat       = 70
	tagBitBinary      = 77
	tagNewPid         = 88
	tagNewPort        = 89
	tagNewerReference = 90
	tagSmallInteger   = 97
	tagInteger        = 98
	tagFloat          = 99
	tagAtom           = 100
	tagReference      = 101
	tagPort           = 102
	tagPid            = 103
	tagSmallTuple     = 104
	tagLargeTuple     = 105
	tagNil            = 106
	tagString         = 107
	tagList           = 108
	tagBinary         = 109
	tagSmallBig       = 110
	tagLargeBig       = 111
	tagNewReference   = 114
	tagSmallAtom      = 115
	tagMap            = 116
	tagAtomUTF8       = 118
	tagSmallAtomUTF8  = 119
	tagV4Port         = 120
)

// Encode returns the external format of t, with the leading version byte.
func Encode(t Term) ([]byte, error) {
	return AppendEncode(make([]byte, 0, 64), t)
}

// AppendEncode appends the external format of t, with the version byte, to b.
func AppendEncode(b []byte, t Term) ([]byte, error) {
	b = append(b, versionTag)
	return appendTerm(b, t)
}

func appendTerm(b []byte, t Term) ([]byte, error) {
	switch v := t.(type) {
	case nil:
		return append(b, tagNil), nil
	case Atom:
		return appendAtom(b, v)
	case bool:
		if v {
			return appendAtom(b, "true")
		}
		return appendAtom(b, "false")
	case int:
		return appendInt(b, int64(v)), nil
	case int32:
		return appendInt(b, int64(v)), nil
	case uint32:
		return appendInt(b, int64(v)), nil
	case int64:
		return appendInt(b, v), nil
	case uint64:
		if v <= math.MaxInt64 {
			return appendInt(b, int64(v)), nil
		}
		return appendBig(b, new(big.Int).SetUint64(v)), nil
	case *big.Int:
		if v.IsInt64() {
			return appendInt(b, v.Int64()), nil
		}
		return appendBig(b, v), nil
	case float64:
		b = append(b, tagNewFloat)
		return binary.BigEndian.AppendUint64(b, math.Float64bits(v)), nil
	case []byte:
		b = append(b, tagBinary)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		return append(b, v...), nil
	case string:
		b = append(b, tagBinary)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		return append(b, v...), nil
	case BitBinary:
		b = append(b, tagBitBinary)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v.Bytes)))
		b = append(b, v.Bits)
		return append(b, v.Bytes...), nil
	case Tuple:
		if len(v) < 256 {
			b = append(b, tagSmallTuple, byte(len(v)))
		} else {
			b = append(b, tagLargeTuple)
			b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		}
		return appendTerms(b, v)
	case List:
		if len(v) == 0 {
			return append(b, tagNil), nil
		}
		b = append(b, tagList)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b, err := appendTerms(b, v)
		if err != nil {
			return nil, err
		}
		return append(b, tagNil), nil
	case ImproperList:
		b = append(b, tagList)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v.Elems)))
		b, err := appendTerms(b, v.Elems)
		if err != nil {
			return nil, err
		}
		return appendTerm(b, v.Tail)
	case Map:
		b = append(b, tagMap)
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		var err error
		for _, e := range v {
			if b, err = appendTerm(b, e.Key); err != nil {
				return nil, err
			}
			if b, err = appendTerm(b, e.Value); err != nil {
				return nil, err
			}
		}
		return b, nil
	case Pid:
		b = append(b, tagNewPid)
		b, err := appendAtom(b, v.Node)
		if err != nil {
			return nil, err
		}
		b = binary.BigEndian.AppendUint32(b, v.ID)
		b = binary.BigEndian.AppendUint32(b, v.Serial)
		return binary.BigEndian.AppendUint32(b, v.Creation), nil
	case Ref:
		if len(v.IDs) == 0 || len(v.IDs) > 5 {
			return nil, fmt.Errorf("etf: reference with %d ids", len(v.IDs))
		}
		b = append(b, tagNewerReference)
		b = binary.BigEndian.AppendUint16(b, uint16(len(v.IDs)))
		b, err := appendAtom(b, v.Node)
		if err != nil {
			return nil, err
		}
		b = binary.BigEndian.AppendUint32(b, v.Creation)
		for _, id := range v.IDs {
			b = binary.BigEndian.AppendUint32(b, id)
		}
		return b, nil
	case Port:
		b = append(b, tagV4Port)
		b, err := appendAtom(b, v.Node)
		if err != nil {
			return nil, err
		}
		b = binary.BigEndian.AppendUint64(b, v.ID)
		return binary.BigEndian.AppendUint32(b, v.Creation), nil
	}
	return nil, fmt.Errorf("etf: cannot encode %T", t)
}

func appendTerms(b []byte, ts []Term) ([]byte, error) {
	var err error
	for _, t := range ts {
		if b, err = appendTerm(b, t); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func appendAtom(b []byte, a Atom) ([]byte, error) {
	// Erlang limits atoms to 255 characters; 255*4 bytes bounds UTF-8.
	if len(a) > 255*4 {
		return nil, fmt.Errorf("etf: atom too long (%d bytes)", len(a))
	}
	if len(a) < 256 {
		b = append(b, tagSmallAtomUTF8, byte(len(a)))
	} else {
		b = append(b, tagAtomUTF8)
		b = binary.BigEndian.AppendUint16(b, uint16(len(a)))
	}
	return append(b, a...), nil
}

func appendInt(b []byte, v int64) []byte {
	switch {
	case v >= 0 && v <= 255:
		return append(b, tagSmallInteger, byte(v))
	case v >= math.MinInt32 && v <= math.MaxInt32:
		b = append(b, tagInteger)
		return binary.BigEndian.AppendUint32(b, uint32(int32(v)))
	}
	return appendBig(b, big.NewInt(v))
}

func appendBig(b []byte, v *big.Int) []byte {
	sign := byte(0)
	if v.Sign() < 0 {
		sign = 1
	}
	mag := new(big.Int).Abs(v).Bytes() // big-endian; ETF wants little-endian
	if len(mag) < 256 {
		b = append(b, tagSmallBig, byte(len(mag)), sign)
	} else {
		b = append(b, tagLargeBig)
		b = binary.BigEndian.AppendUint32(b, uint32(len(mag)))
		b = append(b, sign)
	}
	for i := len(mag) - 1; i >= 0; i-- {
		b = append(b, mag[i])
	}
	return b
}
