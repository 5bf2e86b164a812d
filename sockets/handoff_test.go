package sockets

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/megaphone-im/megaphone/etf"
	"go.uber.org/zap"
)

// movingBackend is a c2s stand-in that echoes stanzas, for streams that
// move between two registries (two sidecar processes).
type movingBackend struct {
	mu      sync.Mutex
	streams map[uint64]*movingStream
}

type movingStream struct {
	echoStream
	closed    atomic.Int32
	forgotten atomic.Bool // the stream moved: its Close says nothing to c2s
}

func (s *movingStream) Close() {
	if !s.forgotten.Load() {
		s.closed.Add(1)
	}
}

func (b *movingBackend) OpenStream(_ context.Context, open etf.C2SOpen, sink StreamSink) (Stream, error) {
	st := &movingStream{echoStream: echoStream{sink: sink}}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.streams == nil {
		b.streams = make(map[uint64]*movingStream)
	}
	b.streams[open.ConnID] = st
	return st, nil
}

func (b *movingBackend) stream(id uint64) *movingStream {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.streams[id]
}

// AdoptStream hands the moved stream's c2s a new sink, as the attachment
// does in the new process.
func (b *movingBackend) AdoptStream(id uint64, sink StreamSink) (Stream, bool) {
	st := &movingStream{echoStream: echoStream{sink: sink}}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.streams[id] = st
	return st, true
}

// moveOne pauses the one open stream of from, and carries it on in to
// with a duplicate of its socket, as a takeover does.
func moveOne(t *testing.T, from, to *Registry, backend *movingBackend, adopt func(StreamState, net.Conn) error) StreamState {
	t.Helper()
	moving := from.PauseStreams(2 * time.Second)
	if len(moving) != 1 {
		t.Fatalf("%d streams paused, want 1", len(moving))
	}
	m := moving[0]
	if err := m.StopWriting(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	f, err := m.Socket().(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	old := backend.stream(m.State.ConnID)
	old.forgotten.Store(true)
	if err := adopt(m.State, conn); err != nil {
		t.Fatal(err)
	}
	m.Moved()
	if old.closed.Load() != 0 {
		t.Error("the old process told c2s the client left")
	}
	return m.State
}

// waitOpen waits (bounded) until r has n open connections.
func waitOpen(t *testing.T, r *Registry, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if r.Stats().Open == n {
			return
		}
	}
	t.Fatalf("%d open connections, want %d", r.Stats().Open, n)
}

// A plain stream paused in the middle of a stanza moves to another
// registry with the stanza's first bytes; the client, which never notices,
// finishes the stanza and gets every echo in order from the new side.
func TestPlainStreamMoves(t *testing.T) {
	from, to := NewRegistry(Limits{}), NewRegistry(Limits{})
	lis, err := ListenStreams("127.0.0.1:0", from, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	backend := &movingBackend{}
	go ServeC2S(lis, C2SConfig{HandshakeTimeout: 5 * time.Second}, backend, false)

	client, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))
	second := "<message to='b@x'><body>2</body></message>"
	io.WriteString(client, header+"<message to='b@x'><body>1</body></message>"+second[:20])
	var got bytes.Buffer
	readUntil(t, client, &got, "<body>1</body>")

	st := moveOne(t, from, to, backend, func(st StreamState, conn net.Conn) error {
		return AdoptC2S(to, C2SConfig{}, backend, st, conn)
	})
	if string(st.Unread) != second[:20] {
		t.Errorf("unread %q, want %q", st.Unread, second[:20])
	}
	waitOpen(t, from, 0)
	io.WriteString(client, second[20:]+"<message to='b@x'><body>3</body></message></stream:stream>")
	rest, _ := io.ReadAll(client)
	got.Write(rest)
	if !strings.Contains(got.String(), "<body>2</body></message><message to='b@x'><body>3</body>") ||
		!strings.HasSuffix(got.String(), "</stream:stream>") {
		t.Errorf("client got %s", got.String())
	}
	// The client sees EOF as the socket closes, a moment before the close
	// has taken the connection out of the registry: wait for it, bounded.
	waitOpen(t, to, 0)
}

// A WebSocket stream paused with half a frame read moves the same way:
// gorilla is resumed on the socket with the half frame, and the client's
// next messages, the rest of that frame first, reach the new side.
func TestWebSocketStreamMoves(t *testing.T) {
	from, to := NewRegistry(Limits{}), NewRegistry(Limits{})
	lis, err := Listen("127.0.0.1:0", from, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	backend := &movingBackend{}
	srv := &http.Server{Handler: NewWebSocketHandler(WebSocketConfig{}, backend),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return WithConn(ctx, c) }}
	go srv.Serve(lis)
	defer srv.Close()

	ws, _, err := websocket.DefaultDialer.Dial("ws://"+lis.Addr().String()+"/", http.Header{"Sec-WebSocket-Protocol": {"xmpp"}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	send := func(s string) {
		t.Helper()
		if err := ws.WriteMessage(websocket.TextMessage, []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(want string) {
		t.Helper()
		_, msg, err := ws.ReadMessage()
		if err != nil || !strings.Contains(string(msg), want) {
			t.Fatalf("got %q (%v), want %q", msg, err, want)
		}
	}
	send(`<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="localhost" version="1.0"/>`)
	expect("<open")
	send(`<message xmlns="jabber:client" to="b@x"><body>1</body></message>`)
	expect("<body>1</body>")
	// Half of a masked frame, written by hand under gorilla.
	frame := maskedTextFrame(`<message xmlns="jabber:client" to="b@x"><body>2</body></message>`)
	if _, err := ws.UnderlyingConn().Write(frame[:9]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the server's reader now holds them

	st := moveOne(t, from, to, backend, func(st StreamState, conn net.Conn) error {
		return AdoptWebSocket(to, WebSocketConfig{}, backend, st, conn)
	})
	if !bytes.Equal(st.Unread, frame[:9]) {
		t.Errorf("unread %x, want %x", st.Unread, frame[:9])
	}
	waitOpen(t, from, 0)
	if _, err := ws.UnderlyingConn().Write(frame[9:]); err != nil {
		t.Fatal(err)
	}
	expect("<body>2</body>")
	send(`<message xmlns="jabber:client" to="b@x"><body>3</body></message>`)
	expect("<body>3</body>")
	if err := ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	send(`<close xmlns="urn:ietf:params:xml:ns:xmpp-framing"/>`)
	expect("<close")
}

// maskedTextFrame is one client-to-server text frame (RFC 6455 §5.2).
func maskedTextFrame(payload string) []byte {
	b := []byte{0x81}
	if len(payload) < 126 {
		b = append(b, 0x80|byte(len(payload)))
	} else {
		b = append(b, 0x80|126)
		b = binary.BigEndian.AppendUint16(b, uint16(len(payload)))
	}
	mask := []byte{1, 2, 3, 4}
	b = append(b, mask...)
	for i := range len(payload) {
		b = append(b, payload[i]^mask[i%4])
	}
	return b
}

// The tap finds where messages end whatever the reads' sizes: fragmented
// messages, control frames between fragments, 16-bit lengths.
func TestWSTapFindsMessageEnds(t *testing.T) {
	long := strings.Repeat("x", 300)
	first := maskedTextFrame("a")
	first[0] = 0x01 // text, not final
	cont := maskedTextFrame("b")
	cont[0] = 0x80 // continuation, final
	ping := maskedTextFrame("p")
	ping[0] = 0x89
	stream := bytes.Join([][]byte{first, ping, cont, maskedTextFrame(long), maskedTextFrame("c")}, nil)
	wantEnds := []int64{int64(len(first) + len(ping) + len(cont)), int64(len(stream) - len(maskedTextFrame("c"))), int64(len(stream))}
	for step := 1; step <= len(stream); step += 7 {
		var tap wsTap
		for i := 0; i < len(stream); i += step {
			tap.record(stream[i:min(i+step, len(stream))])
		}
		if tap.broken || len(tap.ends) != 3 || tap.ends[0] != wantEnds[0] || tap.ends[1] != wantEnds[1] || tap.ends[2] != wantEnds[2] {
			t.Fatalf("reads of %d: ends %v (broken %v), want %v", step, tap.ends, tap.broken, wantEnds)
		}
		tap.messageRead()
		if rest, _ := tap.unconsumed(); !bytes.Equal(rest, stream[wantEnds[0]:]) {
			t.Fatalf("reads of %d: after the first message %d bytes are left, want %d", step, len(rest), len(stream)-int(wantEnds[0]))
		}
	}
}

func readUntil(t *testing.T, c net.Conn, into *bytes.Buffer, want string) {
	t.Helper()
	buf := make([]byte, 4096)
	for !strings.Contains(into.String(), want) {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q: %v; got %q", want, err, into.String())
		}
		into.Write(buf[:n])
	}
}
