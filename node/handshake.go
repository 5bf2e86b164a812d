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
//
// headerBytes is the handshake frames' length header: 2 over TCP
// (inet_tcp_dist's {packet, 2}), 4 over TLS (inet_tls_dist runs its
// handshake with {packet, 4}).
func clientHandshake(conn net.Conn, headerBytes int, ourName string, cookie string, creation uint32) (peerInfo, *bufio.Reader, error) {
	r := bufio.NewReaderSize(conn, 64<<10)
	info, err := runClientHandshake(conn, r, handshakeFraming(headerBytes), ourName, cookie, creation)
	return info, r, err
}

func runClientHandshake(conn net.Conn, r *bufio.Reader, framing handshakeFraming, ourName string, cookie string, creation uint32) (peerInfo, error) {
	var info peerInfo

	// send_name: 'N', flags, creation, name.
	msg := []byte{'N'}
	msg = binary.BigEndian.AppendUint64(msg, ourFlags)
	msg = binary.BigEndian.AppendUint32(msg, creation)
	msg = binary.BigEndian.AppendUint16(msg, uint16(len(ourName)))
	msg = append(msg, ourName...)
	if err := framing.write(conn, msg); err != nil {
		return info, err
	}

	// recv_status.
	status, err := framing.read(r)
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
		if err := framing.write(conn, []byte("strue")); err != nil {
			return info, err
		}
	default:
		return info, &handshakeError{reason: "peer said " + strconv.Quote(s)}
	}

	// recv_challenge: 'N', flags, challenge, creation, name.
	ch, err := framing.read(r)
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
	if err := framing.write(conn, reply); err != nil {
		return info, err
	}

	// recv_challenge_ack: 'a', digest of ours.
	ack, err := framing.read(r)
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

// handshakeFraming is the size of a handshake frame's length header: 2 or 4.
type handshakeFraming int

// maxHandshakeFrame bounds what a peer can make us allocate: the longest
// handshake message is a name (at most 255 bytes in OTP) and some fields.
const maxHandshakeFrame = 64 << 10

func (f handshakeFraming) write(w io.Writer, msg []byte) error {
	var frame []byte
	if f == 4 {
		frame = binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(msg)), uint32(len(msg)))
	} else {
		frame = binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(msg)), uint16(len(msg)))
	}
	_, err := w.Write(append(frame, msg...))
	return err
}

func (f handshakeFraming) read(r *bufio.Reader) ([]byte, error) {
	head := make([]byte, int(f))
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, err
	}
	var n uint32
	if f == 4 {
		n = binary.BigEndian.Uint32(head)
	} else {
		n = uint32(binary.BigEndian.Uint16(head))
	}
	if n > maxHandshakeFrame {
		return nil, fmt.Errorf("handshake frame of %d bytes", n)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	return msg, nil
}
