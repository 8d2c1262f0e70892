// Package connlimit caps the concurrent connections a server accepts from
// one client address, so that one client cannot hold every file
// descriptor and goroutine of the API. A connection over the cap is still
// accepted for a few seconds, so that the HTTP server (after TLS, if any)
// can answer it clearly (Handler); beyond twice the cap connections are
// closed at once, unanswered, which bounds what one address can hold.
package connlimit

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// OverGrace is how long a connection over the cap may stay to be told so.
const OverGrace = 5 * time.Second

// Listener wraps a net.Listener with a per-address connection cap.
type Listener struct {
	net.Listener
	max int

	mu sync.Mutex
	n  map[string]int
}

// New caps ln at max concurrent connections per remote IP address
// (max <= 0: no cap, ln is returned as is).
func New(ln net.Listener, max int) net.Listener {
	if max <= 0 {
		return ln
	}
	return &Listener{Listener: ln, max: max, n: map[string]int{}}
}

// Max returns the cap.
func (l *Listener) Max() int { return l.max }

// Accept returns the next connection, marked Over when its address
// already has max connections open.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		host := hostOf(c.RemoteAddr())
		l.mu.Lock()
		n := l.n[host]
		if n >= 2*l.max {
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.n[host] = n + 1
		l.mu.Unlock()
		lc := &Conn{Conn: c, l: l, host: host, over: n >= l.max}
		if lc.over {
			c.SetDeadline(time.Now().Add(OverGrace))
		}
		return lc, nil
	}
}

// Open returns how many connections from host are open.
func (l *Listener) Open(host string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[host]
}

func (l *Listener) release(host string) {
	l.mu.Lock()
	if l.n[host] <= 1 {
		delete(l.n, host)
	} else {
		l.n[host]--
	}
	l.mu.Unlock()
}

func hostOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	h, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return h
}

// Conn is a connection counted against its address.
type Conn struct {
	net.Conn
	l    *Listener
	host string
	over bool
	once sync.Once
}

// Over reports whether the connection exceeded its address's cap.
func (c *Conn) Over() bool { return c.over }

// Close closes the connection and releases its place.
func (c *Conn) Close() error {
	c.once.Do(func() { c.l.release(c.host) })
	return c.Conn.Close()
}

type connKey struct{}

// ConnContext is for http.Server.ConnContext: it lets Handler see the
// connection a request came on.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

func overOf(ctx context.Context) (*Conn, bool) {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	lc, ok := c.(*Conn)
	return lc, ok && lc.over
}

// Handler answers requests on connections over the cap with 429 (an AWS
// ThrottlingException, which SDKs retry after a pause) and closes them;
// other requests go to next. The server must set ConnContext.
func Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, over := overOf(r.Context())
		if !over {
			next.ServeHTTP(w, r)
			return
		}
		msg := fmt.Sprintf("too many concurrent connections from %s (at most %d): close idle connections or reuse one (the operator sets the cap with --max-conns-per-client)", c.host, c.l.max)
		b, _ := json.Marshal(map[string]string{"message": msg})
		w.Header().Set("Connection", "close")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Amzn-Errortype", "ThrottlingException")
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(http.StatusTooManyRequests)
		w.Write(b)
	})
}
