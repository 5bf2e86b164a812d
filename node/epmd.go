package node

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// DefaultEPMDPort is where epmd listens unless ERL_EPMD_PORT says otherwise.
const DefaultEPMDPort = 4369

// lookupPort asks the epmd on host for the distribution port of the node
// called name (the part before '@'). It does not register the sidecar: a
// hidden node that only dials out needs no epmd entry.
func lookupPort(ctx context.Context, host string, epmdPort int, name string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(epmdPort)))
	if err != nil {
		return 0, fmt.Errorf("epmd at %s: %w", host, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	// PORT_PLEASE2_REQ: length, 122, name.
	req := make([]byte, 0, 3+len(name))
	req = binary.BigEndian.AppendUint16(req, uint16(1+len(name)))
	req = append(req, 122)
	req = append(req, name...)
	if _, err := conn.Write(req); err != nil {
		return 0, fmt.Errorf("epmd at %s: %w", host, err)
	}
	// PORT2_RESP: 119, result, then on success the port and node details.
	head := make([]byte, 2)
	if _, err := io.ReadFull(conn, head); err != nil {
		return 0, fmt.Errorf("epmd at %s: %w", host, err)
	}
	if head[0] != 119 {
		return 0, fmt.Errorf("epmd at %s: unexpected reply %d", host, head[0])
	}
	if head[1] != 0 {
		return 0, fmt.Errorf("epmd at %s: no node named %q is registered", host, name)
	}
	port := make([]byte, 2)
	if _, err := io.ReadFull(conn, port); err != nil {
		return 0, fmt.Errorf("epmd at %s: %w", host, err)
	}
	return int(binary.BigEndian.Uint16(port)), nil
}
