package sockets

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/xmlstream"
	"go.uber.org/zap"
)

func TestListenerLimitsAndIDs(t *testing.T) {
	registry := NewRegistry(Limits{MaxConnsPerIP: 2})
	lis, err := Listen("127.0.0.1:0", registry, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	accepted := make(chan *Conn, 10)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			accepted <- c.(*Conn)
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", lis.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := dial(), dial()
	first, second := <-accepted, <-accepted
	if first.ID == second.ID || first.ID == 0 {
		t.Errorf("ids %d and %d", first.ID, second.ID)
	}
	refused := dial() // a third from the same address: closed at once
	_ = refused.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := refused.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("over the per-address limit, read %d, %v", n, err)
	}
	first.Close()
	a.Close()
	c := dial() // a place is free again
	select {
	case third := <-accepted:
		third.Close()
	case <-time.After(5 * time.Second):
		t.Error("no connection accepted after one closed")
	}
	b.Close()
	c.Close()
	second.Close()
	if st := registry.Stats(); st.Refused[RefusedMaxConnsPerIP] != 1 || st.Accepted != 3 || st.Open != 0 {
		t.Errorf("stats %+v", st)
	}
}

// echoBackend stands in for ejabberd's c2s: it answers a stream header
// with its own header and echoes every stanza back.
type echoBackend struct {
	mu     sync.Mutex
	opened []etf.C2SOpen
}

type echoStream struct{ sink StreamSink }

func (b *echoBackend) OpenStream(_ context.Context, open etf.C2SOpen, sink StreamSink) (Stream, error) {
	b.mu.Lock()
	b.opened = append(b.opened, open)
	b.mu.Unlock()
	return &echoStream{sink: sink}, nil
}

func (s *echoStream) Send(events []etf.Term) error {
	for _, ev := range events {
		t := ev.(etf.Tuple)
		switch t[0] {
		case etf.Atom("xmlstreamstart"):
			s.sink.Write(etf.Tuple{etf.Atom("xmlstreamstart"), []byte("stream:stream"), etf.List{
				etf.Tuple{[]byte("xmlns"), []byte("jabber:client")},
				etf.Tuple{[]byte("xmlns:stream"), []byte("http://etherx.jabber.org/streams")}}})
		case etf.Atom("xmlel"):
			s.sink.Write(etf.Tuple{etf.Atom("xmlstreamelement"), ev})
		case etf.Atom("xmlstreamend"):
			s.sink.Write(etf.Tuple{etf.Atom("xmlstreamend"), []byte("stream:stream")})
			s.sink.Close("end")
		}
	}
	return nil
}
func (s *echoStream) Close()                {}
func (s *echoStream) Shape(int64)           {}
func (s *echoStream) MaxStanzaBytes() int64 { return 1024 }
func (s *echoStream) Describe() string      { return "echo" }

const header = `<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>`

// STARTTLS is answered by the sidecar itself; the stream after TLS reaches
// the backend as transport tls, and stanzas come back in order.
func TestStartTLSThenStream(t *testing.T) {
	lis, err := Listen("127.0.0.1:0", NewRegistry(Limits{}), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	backend := &echoBackend{}
	go ServeC2S(lis, C2SConfig{TLS: throwawayTLS(t), HandshakeTimeout: 5 * time.Second}, backend, false)

	raw, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(raw, header)
	p := xmlstream.NewParser(raw, xmlstream.Limits{})
	if ev, err := p.Next(); err != nil || ev.(etf.Tuple)[0] != etf.Atom("xmlstreamstart") {
		t.Fatalf("pre-TLS header: %v %v", ev, err)
	}
	if ev, err := p.Next(); err != nil || !strings.Contains(string(mustXML(t, ev)), "<required/>") {
		t.Fatalf("features: %s %v", mustXML(t, ev), err)
	}
	io.WriteString(raw, "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
	if ev, err := p.Next(); err != nil || !strings.HasPrefix(string(mustXML(t, ev)), "<proceed") {
		t.Fatalf("proceed: %v %v", ev, err)
	}
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true}) // the test's own self-signed cert
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, header+"<message to='b@x'><body>1</body></message><message to='b@x'><body>2</body></message></stream:stream>")
	got, _ := io.ReadAll(tc)
	if !strings.Contains(string(got), "<body>1</body></message><message to='b@x'><body>2</body>") ||
		!strings.HasSuffix(string(got), "</stream:stream>") {
		t.Errorf("echo over TLS: %s", got)
	}
	backend.mu.Lock()
	defer backend.mu.Unlock()
	if len(backend.opened) != 1 || backend.opened[0].Transport != "tls" || !backend.opened[0].Peer.Addr().IsLoopback() {
		t.Errorf("opened %+v", backend.opened)
	}
}

func mustXML(t *testing.T, el etf.Term) []byte {
	t.Helper()
	b, err := xmlstream.AppendElement(nil, el)
	if err != nil {
		t.Fatalf("%v: %v", el, err)
	}
	return b
}

func TestShaperPacesToRate(t *testing.T) {
	var s shaper
	if d := s.delay(1 << 20); d != 0 {
		t.Errorf("unshaped stream paused %s", d)
	}
	s.setRate(1000)
	if d := s.delay(500); d != 0 {
		t.Errorf("within the burst, paused %s", d)
	}
	if d := s.delay(1500); d < 900*time.Millisecond || d > 1100*time.Millisecond {
		t.Errorf("1000 bytes over a 1000 B/s rate paused %s, want about 1s", d)
	}
}
