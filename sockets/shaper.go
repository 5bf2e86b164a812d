package sockets

import (
	"sync"
	"sync/atomic"
	"time"
)

// shaper paces how fast a stream is read, to the rate of ejabberd's c2s
// shaper for that session (c2s tells us after authentication). ejabberd
// does the same to its own sockets: it stops reading rather than refuse
// data, so a fast sender is slowed, never cut off, and nothing is lost.
// A token bucket with one second of burst.
type shaper struct {
	rate atomic.Int64 // bytes per second; 0: no shaping

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func (s *shaper) setRate(bytesPerSec int64) { s.rate.Store(bytesPerSec) }

// delay returns how long to pause after n bytes were read; a nil shaper
// (a stream c2s does not run yet) never pauses.
func (s *shaper) delay(n int) time.Duration {
	if s == nil {
		return 0
	}
	rate := float64(s.rate.Load())
	if rate <= 0 {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if s.last.IsZero() {
		s.tokens = rate
	} else {
		s.tokens = min(rate, s.tokens+rate*now.Sub(s.last).Seconds())
	}
	s.last = now
	s.tokens -= float64(n)
	if s.tokens >= 0 {
		return 0
	}
	return time.Duration(-s.tokens / rate * float64(time.Second))
}
