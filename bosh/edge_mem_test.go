package bosh

import (
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

// BenchmarkEdgeIdleSessionMemory reports what the sidecar holds for an
// idle edge session (its HTTP connection with one held long-poll, the
// session, a fake c2s stream): heap in use and goroutine stacks per
// session, the clients' side being bare connections that hold nothing.
// Measured 2026-12-02: ~23 KiB of heap (of which net/http's bufio reader
// and writers for the held request ~10 KiB; the session itself ~1 KiB)
// and ~11 KiB of stack (BENCH.md, "BOSH at the edge").
func BenchmarkEdgeIdleSessionMemory(b *testing.B) {
	const n = 500
	lis, err := sockets.Listen("127.0.0.1:0", sockets.NewRegistry(sockets.Limits{MaxBodyBytes: 4096}), zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	streams := &fakeStreams{}
	h := NewHandler(Config{MaxWait: time.Minute, Edge: EdgeConfig{Streams: streams, Inactivity: time.Minute}})
	srv := &http.Server{Handler: h, ConnContext: sockets.WithConn}
	go srv.Serve(lis)
	defer srv.Close()
	url := "http://" + lis.Addr().String() + "/bosh"
	tr := &http.Transport{MaxIdleConnsPerHost: 2 * n, DialContext: (&net.Dialer{}).DialContext}
	client := &http.Client{Transport: tr}
	defer tr.CloseIdleConnections()
	measure := func() (heap, stack uint64) {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse, m.StackInuse
	}
	for range b.N {
		h0, s0 := measure()
		for i := 0; i < n; i++ {
			resp, err := client.Post(url, "text/xml", strings.NewReader(`<body xmlns='`+NS+`' rid='100' to='localhost' wait='60' hold='1' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>`))
			if err != nil {
				b.Fatal(err)
			}
			var buf [4096]byte
			k, _ := resp.Body.Read(buf[:])
			resp.Body.Close()
			sid := sidRE.FindStringSubmatch(string(buf[:k]))[1]
			// The poll on a bare connection nobody reads: the client
			// side holds no goroutine or buffer of its own.
			c, err := net.Dial("tcp", lis.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			poll := fmt.Sprintf(`<body xmlns='%s' sid='%s' rid='101'/>`, NS, sid)
			fmt.Fprintf(c, "POST /bosh HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s", len(poll), poll)
		}
		tr.CloseIdleConnections()
		time.Sleep(2 * time.Second)
		h1, s1 := measure()
		b.ReportMetric(float64(h1-h0)/n/1024, "heapKiB/session")
		b.ReportMetric(float64(s1-s0)/n/1024, "stackKiB/session")
		h.Shutdown()
	}
}
