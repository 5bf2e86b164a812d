package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/megaphone-im/megaphone/etf"
)

// StreamSink receives what ejabberd writes to one client stream. Its
// methods run on the link's reader goroutine: they must not block (queue
// the bytes, close the socket later).
type StreamSink interface {
	// Write is one stream event from c2s ({xmlstreamelement, El}, ...).
	Write(ev etf.Term)
	// Close says the stream is over: c2s closed it or died, or the link
	// to its node went down. No Write follows.
	Close(reason string)
	// Abort says ejabberd can no longer serve the stream (its link went
	// down, the sidecar is stopping): the client is told with a stream
	// error of that condition, then the stream is closed. No Write follows.
	Abort(condition string)
	// Shape sets how fast the client may send, in bytes per second (0:
	// no limit): ejabberd's c2s shaper for the session.
	Shape(bytesPerSec int64)
}

// Stream is the sidecar's end of one ejabberd_c2s running in element mode.
type Stream struct {
	a         *Attachment
	s         *session
	connID    uint64
	c2s       etf.Pid
	maxStanza int64
}

type streamEntry struct {
	sink      StreamSink
	session   *session
	monitor   string // the monitor on the c2s process, by reference
	c2s       etf.Pid
	ref       etf.Ref
	maxStanza int64
}

// ErrStreamRefused means the shim could not start c2s for the stream.
var ErrStreamRefused = errors.New("ejabberd refused the stream")

// OpenStream starts ejabberd_c2s for a client stream the sidecar has
// framed, and returns once c2s runs. Everything c2s writes goes to sink.
func (a *Attachment) OpenStream(ctx context.Context, open etf.C2SOpen, sink StreamSink) (*Stream, error) {
	waitCtx, cancel := context.WithTimeout(ctx, a.attachWait)
	s, err := a.current(waitCtx)
	cancel()
	if err != nil {
		return nil, err
	}
	reply := make(chan any, 1)
	a.mu.Lock()
	a.opens[open.ConnID] = reply
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.opens, open.ConnID)
		a.mu.Unlock()
	}()
	if err := s.send(open.Term()); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrLinkLost, err)
	}
	var started etf.C2SStarted
	select {
	case m := <-reply:
		switch m := m.(type) {
		case etf.C2SStarted:
			started = m
		case etf.C2SRefused:
			return nil, fmt.Errorf("%w: %s", ErrStreamRefused, m.Reason)
		}
	case <-s.link.Done():
		return nil, ErrLinkLost
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	st := &Stream{a: a, s: s, connID: open.ConnID, c2s: started.C2S, maxStanza: started.MaxStanzaBytes}
	// If c2s dies without closing (a crash, a kill), its monitor tells us,
	// so the client socket does not linger.
	ref, err := s.link.Monitor(started.C2S)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrLinkLost, err)
	}
	a.mu.Lock()
	a.streams[open.ConnID] = &streamEntry{sink: sink, session: s, monitor: ref.String(),
		c2s: started.C2S, ref: ref, maxStanza: started.MaxStanzaBytes}
	a.byMonitor[ref.String()] = open.ConnID
	a.mu.Unlock()
	return st, nil
}

// MaxStanzaBytes is ejabberd's max_stanza_size for the stream (0: none).
func (st *Stream) MaxStanzaBytes() int64 { return st.maxStanza }

// Describe names the stream's c2s process, as ejabberd prints its pid.
func (st *Stream) Describe() string { return st.c2s.String() }

// Send hands parsed client events straight to the c2s process.
func (st *Stream) Send(events []etf.Term) error {
	return st.s.link.Send(st.c2s, etf.C2SInput(events))
}

// Close tells c2s the client has gone, and forgets the stream.
func (st *Stream) Close() {
	if st.a.forgetStream(st.connID) {
		_ = st.s.link.Send(st.c2s, etf.C2SClientClosed())
	}
}

// forgetStream removes a stream; it reports whether it was still there.
func (a *Attachment) forgetStream(connID uint64) bool { return a.takeStream(connID) != nil }

// takeStream removes a stream and returns it, or nil if it is gone.
func (a *Attachment) takeStream(connID uint64) *streamEntry {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.streams[connID]
	if e != nil {
		delete(a.streams, connID)
		delete(a.byMonitor, e.monitor)
	}
	return e
}

// sink returns the live stream's sink, or nil.
func (a *Attachment) sink(connID uint64) StreamSink {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e := a.streams[connID]; e != nil {
		return e.sink
	}
	return nil
}

// answerOpen hands the shim's answer to a c2s_open to its waiting caller.
func (a *Attachment) answerOpen(connID uint64, answer any) bool {
	a.mu.Lock()
	ch := a.opens[connID]
	a.mu.Unlock()
	if ch != nil {
		ch <- answer // buffered: one answer per open
	}
	return ch != nil
}

// Streams returns how many client streams this attachment carries.
func (a *Attachment) Streams() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.streams)
}

// handleStreamMessage routes a c2s message to its stream; it reports
// false if no stream (or open) of ours has the connection. It runs on the
// link's reader goroutine.
func (a *Attachment) handleStreamMessage(msg any) bool {
	switch m := msg.(type) {
	case etf.C2SStarted:
		return a.answerOpen(m.ConnID, m)
	case etf.C2SRefused:
		return a.answerOpen(m.ConnID, m)
	case etf.C2SOut:
		if sink := a.sink(m.ConnID); sink != nil {
			sink.Write(m.Event)
			return true
		}
	case etf.C2SClose:
		return a.closeStream(m.ConnID, "closed by ejabberd")
	case etf.C2SShaper:
		if sink := a.sink(m.ConnID); sink != nil {
			sink.Shape(m.BytesPerSec)
			return true
		}
	}
	return false
}

func (a *Attachment) closeStream(connID uint64, reason string) bool {
	e := a.takeStream(connID)
	if e != nil {
		e.sink.Close(reason)
	}
	return e != nil
}

// streamDown handles the 'DOWN' of a c2s monitor; it reports whether the
// monitor was one of ours.
func (a *Attachment) streamDown(ref etf.Ref) bool {
	a.mu.Lock()
	id, ok := a.byMonitor[ref.String()]
	a.mu.Unlock()
	if ok {
		a.closeStream(id, "c2s ended")
	}
	return ok
}

// dropStreams ends every stream of a session whose link went down, each
// with a stream error of the given condition: their c2s processes end too,
// by their monitors on the sidecar.
func (a *Attachment) dropStreams(s *session, condition string) {
	a.mu.Lock()
	var ids []uint64
	for id, e := range a.streams {
		if e.session == s {
			ids = append(ids, id)
		}
	}
	a.mu.Unlock()
	for _, id := range ids {
		if e := a.takeStream(id); e != nil {
			e.sink.Abort(condition)
		}
	}
}
