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
	conn   net.Conn // the client socket, or TLS over it
	framer *xmlstream.Framer
	shaper *shaper // nil before c2s runs

	// poll is the socket under conn, read without waiting (idleread.go);
	// nil: conn is read the blocking way. direct: conn is poll itself, no
	// TLS buffers in between. drained: the last read found nothing (or,
	// when direct, less than it asked for), so wait before reading again.
	poll            *pollingConn
	direct, drained bool
	// parks: once drained between two units, the reader gives its socket
	// to the poller and ends (next returns errParked) instead of waiting.
	parks bool

	queue  []etf.Term // events of the last read not handed out yet
	err    error      // what ended the last read, once the queue is out
	broken error      // a broken stream: every later call returns it
}

func newStreamReader(conn net.Conn, limits xmlstream.Limits) *streamReader {
	// Not drained at first: TLS may have read past its handshake.
	r := &streamReader{conn: conn, framer: xmlstream.NewFramer(limits)}
	if r.poll, r.direct = pollingSocket(conn); r.poll != nil {
		r.poll.polling.Store(true)
	}
	return r
}

// errParked: the reader gave its socket to the poller; the goroutine that
// got it must end without touching the stream, whose next reader the
// poller starts.
var errParked = errors.New("the stream waits in the poller")

// parkWhenIdle lets the reader give its socket to the poller when it has
// nothing to read, with owner's readOn to run once there is input. Only an
// open stream parks: before c2s runs, the reader is the goroutine that
// opens the stream, and the handshake deadline bounds its reads.
func (r *streamReader) parkWhenIdle(owner parkedReader) {
	if r.poll != nil {
		r.poll.mu.Lock()
		r.poll.owner = owner
		r.poll.mu.Unlock()
		r.parks = true
	}
}

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
		r.queue = nil // an idle stream keeps no array (a burst grows it)
		if r.broken != nil {
			return nil, r.broken
		}
		if err := r.err; err != nil {
			r.err = nil // a read deadline is not for good (a takeover that failed reads on)
			return nil, err
		}
		if r.poll != nil && r.drained {
			if r.parks && r.framer.Idle() {
				// The next reader reads first: it runs because there is
				// input, or to find the socket closed or a takeover's
				// deadline. Set before parking: once parked, r is its.
				r.drained = false
				if r.poll.park() {
					return nil, errParked
				}
				r.drained = true
			}
			if err := r.poll.waitReadable(); err != nil {
				r.err = err
				continue
			}
		}
		buf := readBufs.Get().(*[]byte)
		n, err := r.conn.Read(*buf)
		blocked := errors.Is(err, errWouldBlock)
		if blocked && n == 0 { // TLS had no whole record: wait for more
			readBufs.Put(buf)
			r.drained = true
			continue
		}
		if blocked {
			// crypto/tls hands out what it decrypted together with the
			// error of reading on, when a partial alert record follows
			// it: the bytes count, the error only says "wait".
			err = nil
		}
		r.drained = blocked || (r.direct && n < len(*buf))
		if n > 0 {
			if ferr := r.framer.Feed((*buf)[:n], r.push); ferr != nil {
				err, r.broken = ferr, ferr
			}
		}
		readBufs.Put(buf)
		if pause := r.shaper.delay(n); pause > 0 {
			time.Sleep(pause) // reading waits, as ejabberd's shaper makes it
		}
		if errors.Is(err, io.EOF) {
			if ferr := r.framer.End(); ferr != nil {
				err, r.broken = ferr, ferr
			}
		}
		r.err = err
	}
}

// release gives back what the reader holds, and lets the socket be read
// the blocking way again (a TLS handshake next, or the stream ended here).
func (r *streamReader) release() {
	r.framer.Release()
	if r.poll != nil {
		r.poll.polling.Store(false)
	}
}
