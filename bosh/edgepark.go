package bosh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/megaphone-im/megaphone/sockets"
)

// Parking held long-polls (edge mode).
//
// An idle BOSH session is one request held for up to `wait` seconds. Held
// by net/http, it costs its connection's goroutine (its stack, ~11 KiB
// measured) and its bufio reader and writers (~10 KiB), for nothing: the
// session only waits for c2s. So an edge session's held request that has
// had no answer for defaultParkAfter (edge.go) is taken from net/http
// (Hijack) and parked: the session keeps only the socket.
// When the answer comes, it is written on the socket from a short-lived
// goroutine, and the connection is handed back to an HTTP server of our
// own (same settings and handler as the one it came from), which reads
// the client's next request on it as on any keep-alive connection.
//
// What net/http did for the parked request that we do instead: the write
// deadline (parkWriteTimeout); noticing a client that hangs up, which we
// do not: its answer is written into a dead socket and kept for the
// client's re-send, as for any answer, and the socket closes then, within
// `wait`.

// parkWriteTimeout bounds the write of a parked request's answer.
const parkWriteTimeout = 10 * time.Second

// parking is the edge front's way back into HTTP for parked connections.
type parking struct {
	mu      sync.Mutex
	server  *http.Server  // serves handed-back connections, made on first use
	lis     *connListener // its listener
	stopped bool
}

// park takes a held request's connection from net/http. It returns false
// (and the caller waits as usual) where it cannot: not HTTP/1.1 keep-alive,
// or not a connection of ours.
func (f *edgeFront) park(w http.ResponseWriter, r *http.Request, s *edgeSession, wt *edgeWaiter, extraHeaders func(http.Header)) bool {
	if !r.ProtoAtLeast(1, 1) || r.Close {
		return false
	}
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	hj, ok := w.(http.Hijacker)
	if !ok || srv == nil || !f.parking.ready(srv) {
		return false
	}
	raw, rw, err := hj.Hijack()
	if err != nil {
		return false
	}
	conn, ok := raw.(*sockets.Conn)
	if !ok {
		raw.Close()
		return true // nothing can answer it now; the client re-sends
	}
	_ = conn.SetDeadline(time.Time{})
	if n := rw.Reader.Buffered(); n > 0 {
		// The client sent more on this connection already (pipelining):
		// the next reader gets it first.
		b, _ := rw.Reader.Peek(n)
		conn.Unread(append([]byte(nil), b...))
	}
	header := http.Header{}
	corsHeaders(headerWriter{header})
	extraHeaders(header)
	header.Set("Content-Type", "text/xml; charset=utf-8")
	write := func(body []byte) { go f.parking.answer(conn, header, body) }
	s.mu.Lock()
	if wt.done {
		s.mu.Unlock()
		write(<-wt.ch)
		return true
	}
	wt.onAnswer = write
	s.mu.Unlock()
	return true
}

// ready makes sure the server for handed-back connections runs, made like
// srv; it reports false once the front has stopped.
func (p *parking) ready(srv *http.Server) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return false
	}
	if p.server == nil {
		p.lis = &connListener{conns: make(chan net.Conn), done: make(chan struct{}), addr: srv.Addr}
		p.server = &http.Server{Handler: srv.Handler, ConnContext: srv.ConnContext,
			ReadHeaderTimeout: srv.ReadHeaderTimeout, ReadTimeout: srv.ReadTimeout, WriteTimeout: srv.WriteTimeout,
			IdleTimeout: srv.IdleTimeout, MaxHeaderBytes: srv.MaxHeaderBytes, ErrorLog: srv.ErrorLog}
		go p.server.Serve(p.lis)
	}
	return true
}

// answer writes a parked request's answer, then hands the connection
// back to HTTP.
func (p *parking) answer(conn *sockets.Conn, header http.Header, body []byte) {
	_ = conn.SetWriteDeadline(time.Now().Add(parkWriteTimeout))
	b := fmt.Appendf(nil, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n", len(body))
	for k, vs := range header {
		for _, v := range vs {
			b = fmt.Appendf(b, "%s: %s\r\n", k, v)
		}
	}
	b = append(append(b, "\r\n"...), body...)
	_, err := conn.Write(b)
	_ = conn.SetWriteDeadline(time.Time{})
	if err != nil || header.Get("Connection") == "close" || !p.handBack(conn) {
		conn.Close()
	}
}

// handBack gives a connection to the server of handed-back connections;
// false if it has stopped.
func (p *parking) handBack(conn net.Conn) bool {
	p.mu.Lock()
	lis := p.lis
	stopped := p.stopped
	p.mu.Unlock()
	if stopped || lis == nil {
		return false
	}
	select {
	case lis.conns <- conn:
		return true
	case <-lis.done:
		return false
	}
}

// stop closes the server of handed-back connections and the connections
// it serves.
func (p *parking) stop() {
	p.mu.Lock()
	p.stopped = true
	srv := p.server
	p.mu.Unlock()
	if srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if srv.Shutdown(ctx) != nil {
			srv.Close()
		}
	}
}

// connListener is a net.Listener whose connections are handed to it.
type connListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	addr  string
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return parkedAddr(l.addr) }

type parkedAddr string

func (a parkedAddr) Network() string { return "tcp" }
func (a parkedAddr) String() string  { return string(a) }

// headerWriter lets corsHeaders fill a bare header.
type headerWriter struct{ h http.Header }

func (w headerWriter) Header() http.Header       { return w.h }
func (w headerWriter) Write([]byte) (int, error) { return 0, errors.New("headers only") }
func (w headerWriter) WriteHeader(int)           {}
