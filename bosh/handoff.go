package bosh

// LastRequestID returns the last request ID handed out, for a takeover by
// a new sidecar process (sidecar/upgrade.go).
func (h *Handler) LastRequestID() uint64 { return h.reqIDs.Load() }

// ContinueRequestIDs makes the front hand out request IDs after last: the
// process it took over from may still wait for answers to those.
func (h *Handler) ContinueRequestIDs(last uint64) {
	for {
		cur := h.reqIDs.Load()
		if cur >= last || h.reqIDs.CompareAndSwap(cur, last) {
			return
		}
	}
}

// HandOverOrder returns the rid order of every BOSH session, for a process
// taking over (sidecar/upgrade.go). Requests this process has read but not
// yet sent go to ejabberd later, through the new process; so from now on
// every rid it sends is reported (ReportSentTo), and the new process's
// front holds a session's later requests until the earlier ones are out
// (AdoptOrder, SentElsewhere). Call KeepOrder if the takeover fails.
func (h *Handler) HandOverOrder() []SessionOrder { return h.router.order.handOver() }

// ReportSentTo reports each rid this process has sent since HandOverOrder,
// and each later one, to report, once the request is on its way to
// ejabberd.
func (h *Handler) ReportSentTo(report func(sid string, rid uint64)) {
	h.router.order.reportTo(report)
}

// KeepOrder undoes HandOverOrder: the takeover failed.
func (h *Handler) KeepOrder() { h.router.order.keep() }

// AdoptOrder carries on the rid order of the sessions of the process this
// one took over from. Call it before the front serves a request.
func (h *Handler) AdoptOrder(sessions []SessionOrder) { h.router.order.adopt(sessions) }

// SentElsewhere records that the process this one took over from has sent
// rid of session sid to ejabberd (through this process's link): this
// front's requests of that session that wait for it may go.
func (h *Handler) SentElsewhere(sid string, rid uint64) { h.router.order.sent(sid, rid) }
