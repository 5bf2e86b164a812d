package sockets

import (
	"errors"
	"io"
	"net"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/xmlstream"
)

// streamReader reads a client's XMPP stream and hands out its events one
// at a time. Between two units it holds nothing but the framer's state:
// the framer keeps only the bytes of a unit in progress, and what the
// socket gave is parsed as it comes (xmlstream.Framer).
type streamReader struct {
	conn   net.Conn
	framer *xmlstream.Framer
	shaper *shaper // nil before c2s runs

	queue []etf.Term // events of the last read not handed out yet
	err   error      // what ended the last read, once the queue is out
	buf   []byte
}

func newStreamReader(conn net.Conn, limits xmlstream.Limits) *streamReader {
	return &streamReader{conn: conn, framer: xmlstream.NewFramer(limits), buf: make([]byte, readBufSize)}
}

// readBufSize is what one read takes from the socket at most.
const readBufSize = 4 << 10

func (r *streamReader) push(ev etf.Term) error {
	r.queue = append(r.queue, ev)
	return nil
}

// next returns the stream's next event. The end of the input is io.EOF,
// or an error if it came inside a unit; a broken stream gives an error
// wrapping one of xmlstream's stream conditions. A read error (a deadline)
// comes only once the events read before it are out, so a reader that
// stops for a takeover has handed out every whole unit it read.
func (r *streamReader) next() (etf.Term, error) {
	for {
		if len(r.queue) > 0 {
			ev := r.queue[0]
			r.queue[0] = nil
			r.queue = r.queue[1:]
			return ev, nil
		}
		r.queue = r.queue[:0:0]
		if err := r.err; err != nil {
			r.err = nil // a read deadline is not for good (a takeover that failed reads on)
			return nil, err
		}
		n, err := r.conn.Read(r.buf)
		if n > 0 {
			if ferr := r.framer.Feed(r.buf[:n], r.push); ferr != nil {
				err = ferr
			}
			if pause := r.shaper.delay(n); pause > 0 {
				time.Sleep(pause) // reading waits, as ejabberd's shaper makes it
			}
		}
		if errors.Is(err, io.EOF) {
			if ferr := r.framer.End(); ferr != nil {
				err = ferr
			}
		}
		r.err = err
	}
}

// release gives back what the reader holds; the stream has ended here.
func (r *streamReader) release() { r.framer.Release() }
