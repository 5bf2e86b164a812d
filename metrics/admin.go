package metrics

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// AdminHandler serves the admin endpoint:
//
//	/metrics   Prometheus text format: the sidecar's counters, Go runtime, process
//	/healthz   200 while at least one ejabberd node is attached, else 503; the body says which
//	/loglevel  GET shows the log level, PUT {"level":"debug"} sets it (level may be nil: not served)
func AdminHandler(src Sources, level *zap.AtomicLevel) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(src), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { health(w, src) })
	if level != nil {
		mux.Handle("/loglevel", level)
	}
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintln(w, "megaphone admin: /metrics /healthz /loglevel")
	})
	return mux
}

// health answers 200 if any node is attached: the sidecar can serve
// clients then, a cluster's other nodes being down or not.
func health(w http.ResponseWriter, src Sources) {
	var b strings.Builder
	up := false
	for _, a := range src.Attachments {
		s := a.State()
		if s.Attached {
			up = true
			fmt.Fprintf(&b, "%s: attached (protocol %d)\n", s.Peer, s.Version)
		} else {
			fmt.Fprintf(&b, "%s: not attached (%s)\n", s.Peer, s.LastError)
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !up {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, _ = w.Write([]byte(b.String()))
}
