// Package bosh is the sidecar's BOSH front (XEP-0124, XEP-0206): it answers
// what HTTP can answer at the edge (CORS preflight, GET, size limits, bodies
// that are not BOSH at all) and hands every real request to ejabberd's own
// BOSH handler through a Backend, tagged with the connection and request IDs.
package bosh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/etf"
	"github.com/megaphone-im/megaphone/sockets"
	"go.uber.org/zap"
)

// Backend runs a BOSH request in one ejabberd node and returns its answer.
type Backend interface {
	ProcessBOSH(ctx context.Context, req etf.BOSHRequest) (etf.BOSHResponse, error)
}

// Config tunes the front.
type Config struct {
	// MaxWait bounds how long one request may wait for ejabberd. It must
	// exceed the longest BOSH wait ejabberd grants, or long-polls are cut.
	MaxWait time.Duration
	Logger  *zap.Logger
	// Edge, with its Streams set, makes the front keep BOSH sessions
	// itself (edge mode, edge.go): ejabberd runs only each session's c2s.
	// Without, every request goes to ejabberd_bosh (relay mode).
	Edge EdgeConfig
}

// Stats counts what the front has done.
type Stats struct {
	Requests, Forwarded, Refused, Failed, Cancelled uint64
	// Echoes counts ejabberd answers that were the client's own re-sent
	// request (see isEchoedRequest), replaced with an empty body.
	Echoes uint64
	// Overactive counts requests refused for their session's request rate
	// (Limits.MaxBOSHRequestsPerSec) with a policy-violation terminate.
	Overactive uint64
	// EdgeOpen, EdgeCreated and EdgeEnded count the sessions served at the
	// edge (edge mode): open now, created and ended over the run.
	EdgeOpen               int
	EdgeCreated, EdgeEnded uint64
}

// defaultMaxBodyBytes applies when the registry sets no body limit.
const defaultMaxBodyBytes = 64 << 10

// Handler serves BOSH over HTTP.
type Handler struct {
	cfg    Config
	router *router
	edge   *edgeFront // nil in relay mode
	log    *zap.Logger
	reqIDs atomic.Uint64

	// draining refuses new sessions; stopping (cancelled by Shutdown)
	// ends the long-polls being held.
	draining     atomic.Bool
	stopping     context.Context
	stopLongPoll context.CancelFunc
	// closeConns makes every answer close its HTTP connection (a hot
	// upgrade's old process: see CloseConnections).
	closeConns atomic.Bool

	requests, forwarded, refused, failed, cancelled, echoes, overactive atomic.Uint64
}

// NewHandler returns a BOSH front that forwards to the given ejabberd
// nodes: one, or the nodes of a cluster.
func NewHandler(cfg Config, nodes ...Node) *Handler {
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = 330 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	stopping, stop := context.WithCancel(context.Background())
	h := &Handler{cfg: cfg, router: newRouter(nodes), log: cfg.Logger, stopping: stopping, stopLongPoll: stop}
	if cfg.Edge.Streams != nil {
		cfg.Edge.maxWait = cfg.MaxWait
		h.edge = newEdgeFront(cfg.Edge, cfg.Logger)
	}
	return h
}

// SetDraining makes the front refuse (true) or take again (false) new
// sessions: a session creation request is answered with a BOSH
// system-shutdown terminate; sessions already open carry on.
func (h *Handler) SetDraining(on bool) { h.draining.Store(on) }

// CloseConnections makes every answer from now on (those of requests
// being held too) close its HTTP connection (true), or not (false): after
// a hot upgrade the client's next requests go to the new process. Idle
// keep-alive connections are left to the client: closing one can race a
// request the client is sending on it, which is then lost, and Strophe
// re-sends it only after its next request, out of order.
func (h *Handler) CloseConnections(on bool) { h.closeConns.Store(on) }

// answerHeaders sets what every answer carries besides its own headers.
func (h *Handler) answerHeaders(w http.ResponseWriter) {
	if h.closeConns.Load() {
		w.Header().Set("Connection", "close")
	}
}

// Shutdown refuses new sessions and answers every long-poll being held
// with a system-shutdown terminate, for a sidecar that is going away. The
// shim is told to drop those requests, so nothing ejabberd sends later is
// lost: it waits for the client's next request, wherever that goes.
func (h *Handler) Shutdown() {
	h.draining.Store(true)
	if h.edge != nil {
		h.edge.shutdown() // before the long-polls are cut: they get system-shutdown
	}
	h.stopLongPoll()
}

// Sessions returns how many BOSH sessions the front routes to each node.
func (h *Handler) Sessions() map[string]int { return h.router.sessions() }

// Stats returns the front's counters.
func (h *Handler) Stats() Stats {
	st := Stats{Requests: h.requests.Load(), Forwarded: h.forwarded.Load(), Refused: h.refused.Load(),
		Failed: h.failed.Load(), Cancelled: h.cancelled.Load(), Echoes: h.echoes.Load(),
		Overactive: h.overactive.Load()}
	if h.edge != nil {
		st.Overactive += h.edge.overactive.Load()
	}
	if h.edge != nil {
		st.EdgeOpen, st.EdgeCreated, st.EdgeEnded = h.edge.open(), h.edge.created.Load(), h.edge.ended.Load()
	}
	return st
}

// corsHeaders are those ejabberd's own BOSH listener sends, so browser
// clients behave the same through the sidecar.
func corsHeaders(w http.ResponseWriter) {
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
	w.Header().Set("Access-Control-Allow-Headers", "Content-Type")
	w.Header().Set("Access-Control-Max-Age", "86400")
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.requests.Add(1)
	corsHeaders(w)
	h.answerHeaders(w)
	switch r.Method {
	case http.MethodOptions:
		w.WriteHeader(http.StatusOK)
	case http.MethodGet, http.MethodHead:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, getPage)
	case http.MethodPost:
		h.post(w, r)
	default:
		w.Header().Set("Allow", "GET, POST, OPTIONS")
		h.refuse(w, http.StatusMethodNotAllowed, "method not allowed")
	}
}

const getPage = `<!DOCTYPE html>
<html><head><title>Megaphone BOSH</title></head>
<body><h1>Megaphone</h1><p>This is an XMPP BOSH endpoint (XEP-0124, XEP-0206) served by the
Megaphone sidecar for ejabberd. Point a BOSH client at this URL; it accepts POST.</p></body></html>
`

func (h *Handler) post(w http.ResponseWriter, r *http.Request) {
	conn, err := sockets.ConnFrom(r.Context())
	if err != nil {
		h.log.Error("BOSH request without a connection", zap.Error(err))
		h.refuse(w, http.StatusInternalServerError, "internal error")
		return
	}
	conn.SetTransport("bosh")
	maxBody := conn.Limits().MaxBodyBytes
	if maxBody <= 0 {
		maxBody = defaultMaxBodyBytes
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			h.refuse(w, http.StatusRequestEntityTooLarge,
				fmt.Sprintf("request body over %d bytes", maxBody))
			return
		}
		h.refuse(w, http.StatusBadRequest, "could not read the request body")
		return
	}
	peer := conn.Peer
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		peer = ap
	}
	if h.edge != nil {
		h.serveEdge(w, r, conn, peer, body)
		return
	}
	info, err := checkBody(body)
	if h.turnedAway(w, err, info.SID) {
		return
	}
	if perSec := conn.Limits().MaxBOSHRequestsPerSec; perSec > 0 && info.SID != "" {
		if ok, cutNow := h.router.admit(info.SID, perSec, time.Now()); !ok {
			h.overactive.Add(1)
			if cutNow {
				h.endOveractiveSession(r.Context(), conn.ID, peer, info, perSec)
			}
			h.terminate(w, "policy-violation")
			return
		}
	}
	req := etf.BOSHRequest{ConnID: conn.ID, ReqID: h.reqIDs.Add(1), Peer: peer, Body: body}

	ctx, cancel := context.WithTimeout(r.Context(), h.cfg.MaxWait)
	defer cancel()
	defer context.AfterFunc(h.stopping, cancel)()
	h.forwarded.Add(1)
	resp, sid, err := h.router.route(ctx, req, info)
	if sid != "" {
		conn.SetSession(sid)
		conn.SetJID(h.router.jid(sid))
	}
	switch {
	case err == nil:
		if resp.Status == http.StatusOK && isEchoedRequest(body, resp.Body) {
			// See isEchoedRequest: the true answer is an empty body.
			h.echoes.Add(1)
			h.log.Info("ejabberd echoed a re-sent BOSH request; answering it with an empty body",
				zap.Uint64("conn", conn.ID))
			resp.Body = []byte(emptyBody)
		}
		h.write(w, resp)
	case r.Context().Err() != nil:
		// The client hung up; the backend already withdrew the request.
		h.cancelled.Add(1)
	case h.stopping.Err() != nil:
		h.terminate(w, "system-shutdown")
	case errors.Is(err, context.DeadlineExceeded):
		h.failed.Add(1)
		h.refuse(w, http.StatusGatewayTimeout, "ejabberd did not answer in time")
	default:
		// ejabberd is unreachable: XEP-0124 says so with a terminate.
		h.failed.Add(1)
		// Debug only: the attachment logs the outage once; a line per
		// request would flood the log while ejabberd is down.
		h.log.Debug("BOSH request failed", zap.Uint64("conn", conn.ID), zap.Error(err))
		h.terminate(w, "remote-connection-failed")
	}
}

// turnedAway answers, and reports, a request that goes no further: its
// body failed the check (badBody: 400), or it asks for a new session (no
// sid) while the sidecar drains (a system-shutdown terminate).
func (h *Handler) turnedAway(w http.ResponseWriter, badBody error, sid string) bool {
	switch {
	case badBody != nil:
		h.refuse(w, http.StatusBadRequest, badBody.Error())
	case sid == "" && h.draining.Load():
		h.refused.Add(1)
		h.terminate(w, "system-shutdown")
	default:
		return false
	}
	return true
}

// serveEdge answers a request of a session served at the edge (edge.go).
// Its body is parsed once, by parseEdgeRequest, which also checks it.
func (h *Handler) serveEdge(w http.ResponseWriter, r *http.Request, conn *sockets.Conn, peer netip.AddrPort, body []byte) {
	req, err := parseEdgeRequest(body)
	if h.turnedAway(w, err, req.sid) {
		return
	}
	if req.sid != "" {
		conn.SetSession(req.sid)
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.cfg.MaxWait)
	defer cancel()
	h.forwarded.Add(1)
	ans := h.edge.serve(ctx, conn, peer, req, conn.Limits().MaxBOSHRequestsPerSec)
	if ans.waiter != nil {
		closeConn := func(hd http.Header) {
			if h.closeConns.Load() {
				hd.Set("Connection", "close")
			}
		}
		answer, answered := ans.waiter.answerWithin(ctx, h.edge.cfg.parkAfter)
		switch {
		case answered:
			ans = okAnswer(answer)
		case ctx.Err() == nil && h.edge.park(w, r, ans.session, ans.waiter, closeConn):
			return
		default:
			ans = ans.session.await(ctx, ans.waiter)
		}
	}
	switch {
	case ans.status == 0:
		h.cancelled.Add(1) // the client hung up
	case ans.status == http.StatusOK:
		h.write(w, etf.BOSHResponse{Status: ans.status,
			Headers: []etf.Header{{Name: "Content-Type", Value: "text/xml; charset=utf-8"}}, Body: ans.body})
	default:
		h.refuse(w, ans.status, string(bytes.TrimSpace(ans.body)))
	}
}

// overactiveTerminateWait bounds how long the request that went over its
// session's rate waits for ejabberd to end the session.
const overactiveTerminateWait = 5 * time.Second

// endOveractiveSession ends in ejabberd a session the sidecar has cut for
// its request rate, so that it does not linger there (presence, resources)
// until its inactivity timeout: the terminate goes in the client's name,
// with the rid of the request that was refused, which is the one ejabberd
// expects next. A rid that is not a plain number is not written into XML;
// such a session ends by inactivity.
func (h *Handler) endOveractiveSession(ctx context.Context, connID uint64, peer netip.AddrPort, info bodyInfo, perSec int) {
	h.log.Info("BOSH session over its request rate: ended with policy-violation",
		zap.Uint64("conn", connID), zap.String("sid", info.SID), zap.Int("max_per_sec", perSec))
	if len(info.RID) == 0 || len(info.RID) > 20 || strings.Trim(info.RID, "0123456789") != "" ||
		strings.ContainsAny(info.SID, "<&'\"") {
		return
	}
	body := fmt.Sprintf("<body xmlns='%s' sid='%s' rid='%s' type='terminate'/>", NS, info.SID, info.RID)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), overactiveTerminateWait)
	defer cancel()
	req := etf.BOSHRequest{ConnID: connID, ReqID: h.reqIDs.Add(1), Peer: peer, Body: []byte(body)}
	// Through route, so that it takes its place in the session's rid
	// order; the router keeps the session as cut, whatever ejabberd answers.
	if _, _, err := h.router.route(ctx, req, bodyInfo{SID: info.SID, RID: info.RID, Terminate: true}); err != nil {
		h.log.Debug("terminate of an overactive session not delivered", zap.Error(err))
	}
}

func (h *Handler) write(w http.ResponseWriter, resp etf.BOSHResponse) {
	h.answerHeaders(w)
	for _, hd := range resp.Headers {
		w.Header().Set(hd.Name, hd.Value)
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(resp.Body)))
	w.WriteHeader(resp.Status)
	_, _ = w.Write(resp.Body)
}

func (h *Handler) refuse(w http.ResponseWriter, status int, reason string) {
	h.refused.Add(1)
	h.answerHeaders(w)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	io.WriteString(w, reason+"\n")
}

func (h *Handler) terminate(w http.ResponseWriter, condition string) {
	h.answerHeaders(w)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "<body xmlns='%s' type='terminate' condition='%s'/>", NS, condition)
}
