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
