// Package metrics exposes the sidecar's counters in Prometheus' text
// format, and serves the admin endpoint (/metrics, /healthz, /loglevel).
//
// It adds nothing to the data path: every value is read at scrape time
// from counters the other packages keep anyway (sockets.Registry.Stats,
// bosh.Handler.Stats, node.Attachment.State), once per scrape.
package metrics

import (
	"runtime"

	"github.com/megaphone-im/megaphone/bosh"
	"github.com/megaphone-im/megaphone/node"
	"github.com/megaphone-im/megaphone/sockets"
	"github.com/prometheus/client_golang/prometheus"
)

// Sources are what the collector reads. BOSH may be nil (no BOSH front).
type Sources struct {
	Registry    *sockets.Registry
	BOSH        *bosh.Handler
	Attachments []*node.Attachment
	Version     string
}

// Every reason and transport is listed up front, so a series exists (at 0)
// before its first event: rate() and alerts then see the first one.
var (
	transports       = []string{"tcp", "tls", "websocket", "bosh", "opening"}
	refusalReasons   = []string{sockets.RefusedMaxConns, sockets.RefusedMaxConnsPerIP, sockets.RefusedDraining}
	handshakeKinds   = []string{"tls", "starttls"}
	knownTransport   = map[string]bool{"tcp": true, "tls": true, "websocket": true, "bosh": true}
	limitNames       = []string{"max_conns", "max_conns_per_ip", "max_body_bytes", "max_stanza_bytes", "max_bosh_requests_per_sec"}
	boshOutcomeNames = []string{"forwarded", "refused", "failed", "cancelled", "overactive"}
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("megaphone_"+name, help, labels, nil)
}

var (
	buildInfo         = desc("build_info", "The sidecar's build: always 1.", "version", "goversion")
	connectionsOpen   = desc("connections_open", "Open client connections, by transport (opening: no request or stream yet).", "transport")
	connsAccepted     = desc("connections_accepted_total", "Client connections accepted.")
	connsRefused      = desc("connections_refused_total", "Client connections refused, by reason.", "reason")
	bytesIn           = desc("bytes_in_total", "Bytes read from clients.")
	bytesOut          = desc("bytes_out_total", "Bytes written to clients.")
	draining          = desc("draining", "1 while the sidecar refuses new connections and sessions.")
	limit             = desc("limit", "A connection or size limit in force (0: none).", "limit")
	streamErrors      = desc("stream_errors_total", "XMPP stream errors sent to clients, by condition.", "condition")
	handshakeFailures = desc("handshake_failures_total", "Failed client TLS handshakes: tls (direct TLS), starttls.", "kind")
	boshRequests      = desc("bosh_requests_total", "BOSH POST requests taken.")
	boshOutcomes      = desc("bosh_requests_outcome_total", "BOSH requests by outcome: forwarded to ejabberd, refused at the edge, failed (ejabberd unreachable), cancelled (client left), overactive (over the session's request rate: policy-violation).", "outcome")
	boshSessions      = desc("bosh_sessions", "BOSH sessions routed to each ejabberd node.", "node")
	boshEdgeSessions  = desc("bosh_edge_sessions", "BOSH sessions the sidecar keeps itself (--bosh-mode edge); each is a stream of its node.")
	attached          = desc("ejabberd_attached", "1 while attached to the shim on the node.", "node")
	attachAttempts    = desc("ejabberd_attach_attempts_total", "Attempts to attach to the shim on the node.", "node")
	inFlight          = desc("bosh_in_flight", "BOSH requests waiting for the node's answer (the bridge's queue).", "node")
	streams           = desc("streams", "XMPP streams (TCP, TLS, WebSocket) fed to the node's c2s processes.", "node")
	linkSent          = desc("link_messages_sent_total", "Distribution messages sent to the node.", "node")
	linkReceived      = desc("link_messages_received_total", "Distribution messages received from the node.", "node")
)

// Collector reads the sidecar's counters at each scrape.
type Collector struct{ src Sources }

// NewCollector returns a collector over src.
func NewCollector(src Sources) *Collector { return &Collector{src: src} }

// Describe sends every metric's description.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{buildInfo, connectionsOpen, connsAccepted, connsRefused, bytesIn, bytesOut,
		draining, limit, streamErrors, handshakeFailures, boshRequests, boshOutcomes, boshSessions, boshEdgeSessions, attached,
		attachAttempts, inFlight, streams, linkSent, linkReceived} {
		ch <- d
	}
}

// Collect reads the sources once each.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counters := func(d *prometheus.Desc, m map[string]uint64, always []string) {
		for _, k := range always {
			if _, ok := m[k]; !ok {
				counter(d, 0, k)
			}
		}
		for k, v := range m {
			counter(d, v, k)
		}
	}

	gauge(buildInfo, 1, c.src.Version, runtime.Version())

	st := c.src.Registry.Stats()
	open := make(map[string]int, len(transports))
	for t, n := range st.OpenByTransport {
		if !knownTransport[t] {
			t = "opening"
		}
		open[t] += n
	}
	for _, t := range transports {
		gauge(connectionsOpen, float64(open[t]), t)
	}
	counter(connsAccepted, st.Accepted)
	counters(connsRefused, st.Refused, refusalReasons)
	counter(bytesIn, st.BytesIn)
	counter(bytesOut, st.BytesOut)
	gauge(draining, boolValue(st.Draining))
	counters(streamErrors, st.StreamErrors, nil)
	counters(handshakeFailures, st.HandshakeFailures, handshakeKinds)
	lim := c.src.Registry.Limits()
	for i, v := range []int64{int64(lim.MaxConns), int64(lim.MaxConnsPerIP), lim.MaxBodyBytes, lim.MaxStanzaBytes, int64(lim.MaxBOSHRequestsPerSec)} {
		gauge(limit, float64(v), limitNames[i])
	}

	var sessions map[string]int
	if c.src.BOSH != nil {
		b := c.src.BOSH.Stats()
		counter(boshRequests, b.Requests)
		for i, v := range []uint64{b.Forwarded, b.Refused, b.Failed, b.Cancelled, b.Overactive} {
			counter(boshOutcomes, v, boshOutcomeNames[i])
		}
		sessions = c.src.BOSH.Sessions()
		gauge(boshEdgeSessions, float64(b.EdgeOpen))
	}
	for _, a := range c.src.Attachments {
		s := a.State()
		gauge(attached, boolValue(s.Attached), s.Peer)
		counter(attachAttempts, s.Attempts, s.Peer)
		gauge(inFlight, float64(s.InFlight), s.Peer)
		gauge(streams, float64(a.Streams()), s.Peer)
		counter(linkSent, s.Sent, s.Peer)
		counter(linkReceived, s.Received, s.Peer)
		if c.src.BOSH != nil {
			gauge(boshSessions, float64(sessions[s.Peer]), s.Peer)
		}
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
