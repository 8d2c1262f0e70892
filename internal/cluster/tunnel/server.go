package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// Resolver is the node's view of the microVMs it runs; the engine
// implements it (Lookup and RunningNow from memory).
type Resolver interface {
	// Lookup returns where the guest is; proxy.ErrNotFound if the node
	// does not run id.
	Lookup(ctx context.Context, id string) (proxy.Target, error)
	// RunningNow reports that id runs and no suspend or terminate of it
	// has begun: a suspended guest would leave the dial hanging.
	RunningNow(id string) bool
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// TLS must verify client certificates (tls.RequireAndVerifyClientCert
	// with the cluster CA, and whatever role check the caller adds): a
	// tunnel reaches any guest port without an endpoint token, so only
	// edges may open one.
	TLS      *tls.Config
	Resolver Resolver
	// Dial reaches a guest (default: net.Dialer). On a node it must be
	// netns.HostDialer's: the host table lets only marked connections in.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// HandshakeTimeout bounds the TLS handshake, the request header, the
	// dial of the guest and the reply together (default 10 s). Once the
	// tunnel is open no deadline applies: streams and WebSockets may stay
	// quiet for as long as their ends like.
	HandshakeTimeout time.Duration
	// HostPorts are the ports the node serves itself instead of the guest
	// (the shell's 8022 and E2B's envd): a tunnel to one carries HTTP to
	// the handler, with the microVM and its account in the request's
	// context (proxy.MicrovmID, proxy.Account), as `kiln server`'s proxy
	// calls them. The edge checked the token as for any port.
	HostPorts map[uint16]http.Handler
	Logger    *slog.Logger
}

// Server is the node side of the tunnel. An open tunnel is not activity
// of its microVM: the edge keeps idle tunnels for its next requests and
// reports the requests themselves (edge.ActivityReporter).
type Server struct {
	cfg ServerConfig

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewServer checks cfg.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.TLS == nil || cfg.Resolver == nil {
		return nil, errors.New("tunnel: TLS config and resolver are required")
	}
	if cfg.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("tunnel: the TLS config must require and verify client certificates (tls.RequireAndVerifyClientCert with the cluster CA)")
	}
	if cfg.Dial == nil {
		d := &net.Dialer{Timeout: 5 * time.Second}
		cfg.Dial = d.DialContext
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Server{cfg: cfg, conns: map[net.Conn]struct{}{}}, nil
}

// Serve accepts tunnels on ln until ctx ends, then closes ln and every
// open tunnel and returns once their goroutines have ended.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		s.mu.Lock()
		s.closed = true
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	defer stop()
	var err error
	for {
		var c net.Conn
		if c, err = ln.Accept(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond) // out of descriptors: let some close
				continue
			}
			break
		}
		if !s.track(c) {
			c.Close()
			break
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.handle(ctx, c)
		}()
	}
	stop()
	s.wg.Wait()
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("tunnel: accepting: %w", err)
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// handle runs one tunnel: handshake, header, guest dial, reply, splice.
func (s *Server) handle(ctx context.Context, raw net.Conn) {
	raw.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	c := tls.Server(raw, s.cfg.TLS)
	if err := c.HandshakeContext(hctx); err != nil {
		s.cfg.Logger.Debug("tunnel: TLS handshake failed", "remote", raw.RemoteAddr(), "err", err)
		return
	}
	req, err := ReadRequest(c)
	if err != nil {
		var ev errVersion
		code := CodeBadRequest
		if errors.As(err, &ev) {
			code = CodeVersion
		}
		s.cfg.Logger.Warn("tunnel: bad request", "remote", raw.RemoteAddr(), "err", err)
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			c.Write(AppendReply(nil, Reply{Version: Version, Code: code, Msg: err.Error()}))
		}
		return
	}
	if h, ok := s.cfg.HostPorts[req.Port]; ok {
		s.serveHost(ctx, hctx, c, raw, req, h)
		return
	}
	guest, code, msg := s.open(hctx, req)
	if code != CodeOK {
		c.Write(AppendReply(nil, Reply{Version: Version, Code: code, Msg: msg}))
		return
	}
	defer guest.Close()
	if _, err := c.Write(AppendReply(nil, Reply{Version: Version, Code: CodeOK})); err != nil {
		return
	}
	raw.SetDeadline(time.Time{})
	splice(c, guest)
}

// serveHost answers a tunnel to a host port: the microVM must run here,
// and the connection then serves HTTP to h until either end closes it.
func (s *Server) serveHost(ctx, hctx context.Context, c *tls.Conn, raw net.Conn, req Request, h http.Handler) {
	tgt, code, msg := s.resolve(hctx, req.ID)
	if code != CodeOK {
		c.Write(AppendReply(nil, Reply{Version: Version, Code: code, Msg: msg}))
		return
	}
	if _, err := c.Write(AppendReply(nil, Reply{Version: Version, Code: CodeOK})); err != nil {
		return
	}
	raw.SetDeadline(time.Time{})
	hs := &http.Server{
		Handler: h,
		// The edge pools tunnels between requests; these bound a peer that
		// stalls mid-request, as the endpoint listener's do.
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return proxy.WithTarget(ctx, req.ID, tgt.Account) },
		ErrorLog:          slog.NewLogLogger(s.cfg.Logger.Handler(), slog.LevelDebug),
	}
	ln := newConnListener(c)
	stop := context.AfterFunc(ctx, func() { hs.Close() })
	defer stop()
	hs.Serve(ln)
	// A hijacked connection (a WebSocket) outlives Serve: the tunnel ends
	// with it, or when the node stops.
	select {
	case <-ln.done:
	case <-ctx.Done():
	}
}

// connListener hands http.Server the one connection of a tunnel; its
// next Accept fails once that connection is closed (by either end, or by
// a handler that hijacked it) or the listener is, so Serve returns when
// the tunnel is over.
type connListener struct {
	conn   net.Conn
	next   chan net.Conn
	done   chan struct{} // the connection was closed
	closed chan struct{} // the listener was closed
	once   sync.Once
}

func newConnListener(c net.Conn) *connListener {
	l := &connListener{next: make(chan net.Conn, 1), done: make(chan struct{}), closed: make(chan struct{})}
	l.conn = &closeNotifyConn{Conn: c, closed: l.done}
	l.next <- l.conn
	return l
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.next:
		return c, nil
	case <-l.done:
	case <-l.closed:
	}
	return nil, net.ErrClosed
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.conn.LocalAddr() }

// closeNotifyConn closes done when the connection is closed.
type closeNotifyConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *closeNotifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

// resolve finds a microVM that runs on this node.
func (s *Server) resolve(ctx context.Context, id string) (proxy.Target, Code, string) {
	tgt, err := s.cfg.Resolver.Lookup(ctx, id)
	switch {
	case errors.Is(err, proxy.ErrNotFound):
		return tgt, CodeNotFound, "this node does not run microVM " + id
	case err != nil:
		return tgt, CodeUnavailable, "microVM " + id + " cannot be reached now: " + err.Error()
	case !s.cfg.Resolver.RunningNow(id):
		return tgt, CodeUnavailable, "microVM " + id + " is not running on this node; resume it first"
	}
	return tgt, CodeOK, ""
}

// open resolves and dials the guest port a request names.
func (s *Server) open(ctx context.Context, req Request) (net.Conn, Code, string) {
	tgt, code, msg := s.resolve(ctx, req.ID)
	if code != CodeOK {
		return nil, code, msg
	}
	addr := netip.AddrPortFrom(tgt.Addr, req.Port).String()
	g, err := s.cfg.Dial(ctx, "tcp", addr)
	if err != nil {
		return nil, CodeRefused, fmt.Sprintf("microVM %s port %d: %v", req.ID, req.Port, err)
	}
	return g, CodeOK, ""
}

// closeWriter is what TCP and TLS connections offer for a half-close.
type closeWriter interface{ CloseWrite() error }

// splice copies both ways until both directions ended. An end that
// finished sending (EOF) is half-closed on the other side, so a request
// that ends with a FIN still gets its answer; a broken direction (an
// error rather than EOF) ends both, since the other would wait forever.
func splice(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		pipe(b, a)
	}()
	pipe(a, b)
	<-done
}

// pipe copies from src to dst, then half-closes dst, or closes both on
// an error.
func pipe(dst, src net.Conn) {
	_, err := io.Copy(dst, src)
	if cw, ok := dst.(closeWriter); ok && err == nil {
		if cw.CloseWrite() == nil {
			return
		}
	}
	dst.Close()
	src.Close()
}
