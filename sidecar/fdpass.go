package sidecar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
)

// The handoff socket speaks frames: a kind byte, a 4-byte length, the
// payload. Descriptors travel as SCM_RIGHTS on frames of kind
// frameRights, whose length is the number of descriptors and which have
// no payload.
const (
	frameTakeover  = 'T' // new → old: take over, please (payload: version)
	frameState     = 'S' // old → new: the state, msgpack
	frameRights    = 'R' // old → new: a batch of descriptors
	frameAck       = 'A' // new → old: all received, nothing touched yet
	frameGo        = 'G' // old → new: the sockets are yours
	frameDistOut   = 'F' // old → new: a distribution frame to write (payload: attachment index, frame)
	frameDeliver   = 'D' // new → old: a message for the old process (payload: attachment index, ETF)
	frameLinkEnded = 'X' // new → old: an attachment's link went down (payload: attachment index)
	frameRIDEvent  = 'B' // old → new: what became of a BOSH request (payload: kind, rid, sid)
)

// maxFDsPerMessage stays under the kernel's SCM_MAX_FD (253).
const maxFDsPerMessage = 200

// maxHandoffFrame bounds a frame's payload: the state of 100,000 streams
// is well under this.
const maxHandoffFrame = 1 << 30

func writeHandoffFrame(w io.Writer, kind byte, payload []byte) error {
	b := make([]byte, 5, 5+len(payload))
	b[0] = kind
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	_, err := w.Write(append(b, payload...))
	return err
}

func readHandoffFrame(r io.Reader) (byte, []byte, error) {
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(head[1:])
	if n > maxHandoffFrame {
		return 0, nil, fmt.Errorf("handoff frame of %d bytes", n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, err
	}
	return head[0], payload, nil
}

// sendFDs sends descriptors in batches, each on a frameRights header.
func sendFDs(uc *net.UnixConn, fds []int) error {
	for len(fds) > 0 {
		batch := fds[:min(len(fds), maxFDsPerMessage)]
		fds = fds[len(batch):]
		head := []byte{frameRights, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(head[1:], uint32(len(batch)))
		n, oobn, err := uc.WriteMsgUnix(head, syscall.UnixRights(batch...), nil)
		if err != nil {
			return err
		}
		if n != len(head) || oobn == 0 {
			return errors.New("short write of descriptors")
		}
	}
	return nil
}

// receiveFDs receives count descriptors sent by sendFDs. They are
// close-on-exec (Go asks the kernel for MSG_CMSG_CLOEXEC).
func receiveFDs(uc *net.UnixConn, count int) ([]int, error) {
	var fds []int
	closeAll := func() {
		for _, fd := range fds {
			_ = syscall.Close(fd)
		}
	}
	for len(fds) < count {
		head := make([]byte, 5)
		oob := make([]byte, syscall.CmsgSpace(4*maxFDsPerMessage))
		// The header is read whole, in one message, with its rights: the
		// kernel never merges a message carrying descriptors with another.
		n, oobn, _, _, err := uc.ReadMsgUnix(head, oob)
		if err != nil {
			closeAll()
			return nil, err
		}
		msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			got, err := syscall.ParseUnixRights(&m)
			if err == nil {
				fds = append(fds, got...)
			}
		}
		if n != 5 || head[0] != frameRights || perr != nil {
			closeAll()
			return nil, errors.New("expected a batch of descriptors")
		}
		if want := int(binary.BigEndian.Uint32(head[1:])); len(msgs) == 0 || want > maxFDsPerMessage {
			closeAll()
			return nil, errors.New("a batch of descriptors arrived without them")
		}
	}
	if len(fds) != count {
		closeAll()
		return nil, fmt.Errorf("received %d descriptors, expected %d", len(fds), count)
	}
	return fds, nil
}

// fileConn turns a received descriptor into a connection (and closes the
// descriptor: net.FileConn keeps its own duplicate).
func fileConn(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return net.FileConn(f)
}

func fileListener(fd int, name string) (net.Listener, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return net.FileListener(f)
}

// peerIsUs checks that the process on the other end of the handoff socket
// runs as our user: it is about to get every client's socket.
func peerIsUs(uc *net.UnixConn) error {
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Getuid() {
		return fmt.Errorf("handoff peer runs as uid %d, not %d", cred.Uid, os.Getuid())
	}
	return nil
}
