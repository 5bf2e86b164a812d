package etf

import "context"

type sentKey struct{}

// WithSent returns a context that carries f, which the backend calls (via
// Sent) once a request made with it is on its way to the node: written to
// the link, so that whatever is sent after it arrives after it. The BOSH
// front uses it to keep a session's requests in rid order (bosh/order.go).
func WithSent(ctx context.Context, f func()) context.Context {
	return context.WithValue(ctx, sentKey{}, f)
}

// Sent calls the function WithSent put in ctx, if any.
func Sent(ctx context.Context) {
	if f, ok := ctx.Value(sentKey{}).(func()); ok {
		f()
	}
}
