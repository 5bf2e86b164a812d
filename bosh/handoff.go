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

// HandOverOrder returns the rid order of every BOSH session, with the
// requests on their way, for a process taking over (sidecar/upgrade.go).
// Those requests reach ejabberd later, through the new process; so from
// now on what becomes of each request here is reported (ReportTo), and the
// new front holds a session's later requests until the earlier ones are
// out (AdoptOrder, Elsewhere; ridOrder explains). Call KeepOrder if the
// takeover fails.
func (h *Handler) HandOverOrder() []SessionOrder { return h.router.order.handOver() }

// ReportTo reports each event since HandOverOrder, and each later one, to
// report, in order for each request. A request's RIDSent comes once it is
// on its way to ejabberd: report must pass it on behind the request.
func (h *Handler) ReportTo(report func(RIDEvent)) { h.router.order.reportTo(report) }

// KeepOrder undoes HandOverOrder: the takeover failed.
func (h *Handler) KeepOrder() { h.router.order.keep() }

// AdoptOrder carries on the rid order of the sessions of the process this
// one took over from. Call it before the front serves a request.
func (h *Handler) AdoptOrder(sessions []SessionOrder) { h.router.order.adopt(sessions) }

// Elsewhere applies a report of the process this one took over from
// (its ReportTo), in the order they come.
func (h *Handler) Elsewhere(e RIDEvent) { h.router.order.elsewhere(e) }

// ElsewhereEnded says the process this one took over from has ended: its
// requests are no longer waited for.
func (h *Handler) ElsewhereEnded() { h.router.order.elsewhereEnded() }
