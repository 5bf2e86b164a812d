package bosh

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

// scriptedBackend answers every request with one fixed response: in the
// fuzzer, whatever a compromised or broken ejabberd could answer.
type scriptedBackend struct {
	resp etf.BOSHResponse
	got  []etf.BOSHRequest
}

func (b *scriptedBackend) Peer() string   { return "fuzz" }
func (b *scriptedBackend) Attached() bool { return true }

func (b *scriptedBackend) ProcessBOSH(_ context.Context, req etf.BOSHRequest) (etf.BOSHResponse, error) {
	b.got = append(b.got, req)
	return b.resp, nil
}

const fuzzMaxBody = 512

// FuzzHandler drives the BOSH front with any HTTP request a client can
// send (parsed by net/http's own request reader, as the server does) and
// any answer ejabberd can give. Whatever they are: no panic; only POST
// bodies that are one BOSH <body/> within the size limit reach ejabberd,
// with the connection's ID; the client always gets a valid status.
func FuzzHandler(f *testing.F) {
	post := func(body string) string {
		return "POST /bosh HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: " +
			strconv.Itoa(len(body)) + "\r\n\r\n" + body
	}
	echo := "<body xmlns='" + NS + "' rid='1'/>"
	for _, s := range []struct {
		req, hdrName, hdrValue, respBody string
		status                           uint16
	}{
		{post(okBody), "Content-Type", "text/xml", "<body xmlns='" + NS + "' sid='s1'/>", 200},
		{post("<body xmlns='" + NS + "' sid='s1' rid='2' type='terminate'/>"), "X-A", "b", "<body type='terminate'/>", 200},
		{post("<body xmlns='" + NS + "' rid='1'><message xmlns='jabber:client'/></body>"), "", "", echo, 200},
		{"POST /bosh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n<body\r\n0\r\n\r\n", "", "", "", 404},
		{post(strings.Repeat("x", 600)), "", "", "", 200},
		{"OPTIONS /bosh HTTP/1.1\r\nHost: x\r\n\r\n", "", "", "", 200},
		{"GET /bosh HTTP/1.1\r\nHost: x\r\n\r\n", "", "", "", 200},
		{"PUT /bosh HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", "", "", "", 200},
	} {
		f.Add(s.req, s.status, s.hdrName, s.hdrValue, []byte(s.respBody))
	}
	f.Fuzz(func(t *testing.T, raw string, status uint16, hdrName, hdrValue string, respBody []byte) {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return // net/http refuses it before any handler runs
		}
		conn := fuzzConn(t)
		peer := netip.MustParseAddrPort("192.0.2.1:4242")
		req.RemoteAddr = peer.String()
		req = req.WithContext(sockets.WithConn(context.Background(), conn))
		backend := &scriptedBackend{resp: etf.BOSHResponse{
			// What etf.ParseShimMessage lets through.
			Status: 100 + int(status)%900, Headers: []etf.Header{{Name: hdrName, Value: hdrValue}}, Body: respBody}}
		h := NewHandler(Config{MaxWait: time.Second}, backend)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)

		if rec.Code < 100 || rec.Code > 999 {
			t.Fatalf("answered with status %d", rec.Code)
		}
		if len(backend.got) > 1 {
			t.Fatalf("one request reached ejabberd %d times", len(backend.got))
		}
		for _, got := range backend.got {
			if req.Method != http.MethodPost {
				t.Fatalf("a %s request reached ejabberd", req.Method)
			}
			if len(got.Body) > fuzzMaxBody {
				t.Fatalf("a %d-byte body passed the %d-byte limit", len(got.Body), fuzzMaxBody)
			}
			if _, err := checkBody(got.Body); err != nil {
				t.Fatalf("a body that is not BOSH reached ejabberd (%v): %q", err, got.Body)
			}
			if got.ConnID != conn.ID || got.Peer != peer {
				t.Fatalf("forwarded with conn %d peer %s", got.ConnID, got.Peer)
			}
		}
	})
}

var (
	fuzzConnOnce sync.Once
	fuzzConnVal  *sockets.Conn
)

// fuzzConn is one real client connection, accepted once per fuzzing
// process and shared by every input: the handler reads the connection's
// ID and limits from it, and never its bytes.
func fuzzConn(t *testing.T) *sockets.Conn {
	fuzzConnOnce.Do(func() {
		lis, err := sockets.Listen("127.0.0.1:0", sockets.NewRegistry(sockets.Limits{MaxBodyBytes: fuzzMaxBody}), zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		defer lis.Close()
		// The client's end stays open for the process's life; an idle
		// connection holds no goroutine for goleak to find.
		if _, err := net.Dial("tcp", lis.Addr().String()); err != nil {
			t.Fatal(err)
		}
		c, err := lis.Accept()
		if err != nil {
			t.Fatal(err)
		}
		fuzzConnVal = c.(*sockets.Conn)
	})
	if fuzzConnVal == nil {
		t.Fatal("no connection")
	}
	return fuzzConnVal
}
