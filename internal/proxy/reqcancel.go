package proxy

import (
	"context"
	"net"
	"net/http"
	"sync"
)

// reqCancel ends a request on the own loops (h1Conn, h2Conn): its
// context, and the guest connection h1Upstream has tied to it. The
// upstream path finds it in the context (keyCancel) instead of
// registering with context.AfterFunc, which cost three allocations and a
// lock round trip in the parent context per request (2.7% of the proxy's
// CPU in the bench profile). Every cancellation of these requests comes
// from the loops, through cancel: their contexts have no other parent.
type reqCancel struct {
	ctxCancel context.CancelFunc
	mu        sync.Mutex
	done      bool
	conn      net.Conn
}

// loopsBase is the parent of every own-loop request's context. It marks
// the requests as served by a server that recovers http.ErrAbortHandler,
// as the loops do (guard): without the mark ReverseProxy finishes an
// answer whose body the guest broke off as if it were whole (a 200 with
// "Content-Length: 0" and a kept connection for a bad chunk), where
// forwardH1 and the direct path abort it. ReverseProxy only asks whether
// there is a server.
var loopsBase = context.WithValue(context.Background(), http.ServerContextKey, &http.Server{})

// context makes the request's context, rc in it.
func (rc *reqCancel) context() context.Context {
	ctx, cancel := context.WithCancel(loopsBase)
	rc.ctxCancel = cancel
	return context.WithValue(ctx, keyCancel, rc)
}

// cancel ends the context, then breaks off the tied connection, as
// context.AfterFunc would.
func (rc *reqCancel) cancel() {
	rc.ctxCancel()
	rc.mu.Lock()
	rc.done = true
	c := rc.conn
	rc.conn = nil
	rc.mu.Unlock()
	if c != nil {
		c.SetDeadline(aLongTimeAgo)
	}
}

// watch ties c to the request until unwatch: cancel breaks it off, at
// once if the request has ended already.
func (rc *reqCancel) watch(c net.Conn) {
	rc.mu.Lock()
	if rc.done {
		rc.mu.Unlock()
		c.SetDeadline(aLongTimeAgo)
		return
	}
	rc.conn = c
	rc.mu.Unlock()
}

// unwatch unties the connection; false: the request was cancelled, and
// the connection may be broken off.
func (rc *reqCancel) unwatch() bool {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.conn = nil
	return !rc.done
}
