package node

import (
	"bufio"
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
)

// peerInfo is what the handshake learns about the other node.
type peerInfo struct {
	name     string
	flags    uint64 // the flags both sides have
	creation uint32
}

// handshakeError is a refusal by the peer, as opposed to a network failure:
// retrying quickly will not help, so it is logged once and backed off.
type handshakeError struct{ reason string }

func (e *handshakeError) Error() string { return "handshake refused: " + e.reason }

// clientHandshake runs the initiating side of the version 6 handshake
// (OTP 23 and later) on conn. Frames are a 2-byte length and a tag byte.
//
// We write this rather than use ergo's because ergo always advertises
// DFLAG_PUBLISHED (so it can never be hidden), has no DFLAG_UNLINK_ID (which
// OTP 26+ require), and reuses one challenge across connections.
//
// The returned reader holds whatever the peer sent after its ack; the link
// must go on reading from it.
func clientHandshake(conn net.Conn, ourName string, cookie string, creation uint32) (peerInfo, *bufio.Reader, error) {
	r := bufio.NewReaderSize(conn, 64<<10)
	info, err := runClientHandshake(conn, r, ourName, cookie, creation)
	return info, r, err
}

func runClientHandshake(conn net.Conn, r *bufio.Reader, ourName string, cookie string, creation uint32) (peerInfo, error) {
	var info peerInfo

	// send_name: 'N', flags, creation, name.
	msg := []byte{'N'}
	msg = binary.BigEndian.AppendUint64(msg, ourFlags)
	msg = binary.BigEndian.AppendUint32(msg, creation)
	msg = binary.BigEndian.AppendUint16(msg, uint16(len(ourName)))
	msg = append(msg, ourName...)
	if err := writeHandshakeFrame(conn, msg); err != nil {
		return info, err
	}

	// recv_status.
	status, err := readHandshakeFrame(r)
	if err != nil {
		return info, err
	}
	if len(status) < 1 || status[0] != 's' {
		return info, errors.New("handshake: expected status")
	}
	switch s := string(status[1:]); s {
	case "ok", "ok_simultaneous":
	case "alive":
		// A node of our name is still connected (e.g. our previous run
		// has not timed out yet). Saying "false" makes the peer refuse us;
		// saying "true" would make it drop the old connection, which is what
		// a restarted sidecar wants.
		if err := writeHandshakeFrame(conn, []byte("strue")); err != nil {
			return info, err
		}
	default:
		return info, &handshakeError{reason: "peer said " + strconv.Quote(s)}
	}

	// recv_challenge: 'N', flags, challenge, creation, name.
	ch, err := readHandshakeFrame(r)
	if err != nil {
		return info, err
	}
	if len(ch) < 19 || ch[0] != 'N' {
		return info, errors.New("handshake: expected a version 6 challenge")
	}
	peerFlags := binary.BigEndian.Uint64(ch[1:9])
	challenge := binary.BigEndian.Uint32(ch[9:13])
	info.creation = binary.BigEndian.Uint32(ch[13:17])
	nameLen := int(binary.BigEndian.Uint16(ch[17:19]))
	if len(ch) < 19+nameLen {
		return info, errors.New("handshake: truncated challenge")
	}
	info.name = string(ch[19 : 19+nameLen])
	if missing := mandatory25 &^ peerFlags; missing != 0 {
		return info, &handshakeError{reason: fmt.Sprintf("peer lacks mandatory flags %#x", missing)}
	}
	info.flags = ourFlags & peerFlags

	// send_challenge_reply: 'r', our challenge, digest of theirs.
	var mine [4]byte
	if _, err := rand.Read(mine[:]); err != nil {
		return info, err
	}
	ourChallenge := binary.BigEndian.Uint32(mine[:])
	reply := []byte{'r'}
	reply = binary.BigEndian.AppendUint32(reply, ourChallenge)
	d := digest(challenge, cookie)
	reply = append(reply, d[:]...)
	if err := writeHandshakeFrame(conn, reply); err != nil {
		return info, err
	}

	// recv_challenge_ack: 'a', digest of ours.
	ack, err := readHandshakeFrame(r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			// The peer hangs up without a word when our digest is wrong.
			return info, &handshakeError{reason: "connection closed by peer: wrong cookie?"}
		}
		return info, err
	}
	want := digest(ourChallenge, cookie)
	if len(ack) != 17 || ack[0] != 'a' || subtle.ConstantTimeCompare(ack[1:], want[:]) != 1 {
		return info, &handshakeError{reason: "peer failed the challenge: its cookie differs"}
	}
	return info, nil
}

func digest(challenge uint32, cookie string) [16]byte {
	return md5.Sum([]byte(cookie + strconv.FormatUint(uint64(challenge), 10)))
}

func writeHandshakeFrame(w io.Writer, msg []byte) error {
	frame := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(msg)), uint16(len(msg)))
	_, err := w.Write(append(frame, msg...))
	return err
}

func readHandshakeFrame(r *bufio.Reader) ([]byte, error) {
	var head [2]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(head[:]))
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	return msg, nil
}
