// Package proxy is the endpoint server: https://MICROVM_ID.DOMAIN reaches
// one microVM's guest port. It checks the access token before anything
// else (a bad token never wakes a VM), asks the Backend to make the VM
// runnable (auto-resume), and streams the request through without
// buffering: HTTP/1.1, HTTP/2 (h2 via ALPN; gRPC goes to the guest as h2c
// with trailers), WebSocket upgrades, server-sent events and chunked
// bodies.
//
// Routing is by the Host header (":authority" in h2). The TLS SNI is not
// compared with it on purpose: HTTP/2 clients legitimately reuse one
// connection for several names covered by the wildcard certificate
// (connection coalescing), and every request carries its own token.
package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http/httpguts"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// Header and subprotocol names of the AWS Lambda MicroVMs endpoint, as
// The canonical forms of the fields above whose documented spelling is
// not: Header.Get and its kin allocate the canonical key of a spelling
// that is not, on every call.
var (
	fieldAuth       = http.CanonicalHeaderKey(HeaderAuth)
	fieldPort       = http.CanonicalHeaderKey(HeaderPort)
	fieldForceH2    = http.CanonicalHeaderKey(HeaderForceH2)
	fieldWSProtocol = http.CanonicalHeaderKey(wsProtocolField)
)

// AWS's developer guide documents them ("Networking": port routing,
// authentication, protocols; the agent toolkit's networking reference
// lists the reserved x-aws-proxy-* headers and the browser subprotocols).
const (
	HeaderAuth = "X-aws-proxy-auth"
	HeaderPort = "X-aws-proxy-port"
	// HeaderForceH2 "true" makes the proxy speak HTTP/2 over plaintext
	// (h2c) to the app, for servers that only speak h2c.
	HeaderForceH2 = "X-aws-proxy-force-h2"
	// headerPrefix is the namespace AWS reserves: every header in it,
	// known or not, is removed before the app sees the request.
	headerPrefix = "X-Aws-Proxy-" // canonical form
	// SubprotoBase is the bare marker a browser offers first; it says the
	// other lambda-microvms.* values are the platform's, not the app's.
	// The proxy consumes all three and, when the app selects none, answers
	// the marker, since a browser that offered subprotocols refuses a
	// handshake answered with none.
	SubprotoBase    = "lambda-microvms"
	SubprotoAuth    = "lambda-microvms.authentication."
	SubprotoPort    = "lambda-microvms.port."
	DefaultPort     = 8080
	ShellPort       = 8022
	wsProtocolField = "Sec-WebSocket-Protocol"
	// QueryAuth carries an endpoint token in a link a browser opens (a
	// new tab cannot send headers): the proxy checks it, moves it into
	// the CookieAuth cookie of that one host and redirects to the same
	// URL without it, so the token leaves the address bar at once.
	QueryAuth = "kiln-proxy-auth"
	// CookieAuth holds the endpoint token for a browser; the guest never
	// sees it (stripped from requests, and guests cannot set it).
	CookieAuth = "kiln-proxy-auth"
)

// Errors a Backend returns; the proxy maps them to status codes.
var (
	// ErrNotFound: no such microVM (or terminated) → 404.
	ErrNotFound = errors.New("microvm not found")
	// ErrSuspended: suspended and autoResumeEnabled is false → 503.
	ErrSuspended = errors.New("microvm is suspended and auto-resume is disabled")
	// ErrUnavailable: cannot run now (starting failed, terminating) → 503.
	ErrUnavailable = errors.New("microvm unavailable")
)

// Target is what the proxy needs to know about a microVM to route to it.
type Target struct {
	// Account owning the VM; a token minted for another account is refused.
	Account string
	// Addr is the host-side address of the guest (netns.Net.HostAddr);
	// the proxy dials Addr:port.
	Addr netip.Addr
	// Ingress is the ALL_INGRESS connector; without it (NO_INGRESS) the
	// endpoint refuses every port but the shell.
	Ingress bool
	// Shell is the SHELL_INGRESS connector (port 8022 with a shell token).
	Shell bool
	// Dial, when set, reaches the guest's port instead of Config.Dial to
	// Addr:port (kiln edge: through the tunnel to the node that runs the
	// VM); Addr is then unused.
	Dial func(ctx context.Context, port uint16) (net.Conn, error)
	// Route names what Dial reaches: the node and the microVM. Upstream
	// connections are pooled, and a guest's TLS remembered, per Route and
	// port, so that a connection to one microVM never carries another's
	// request, even where two guests on two nodes have the same address.
	Route string
}

// ConnectorAccess derives Target.Ingress and Target.Shell from a microVM's
// ingress network connectors (ARNs ending in the connector's name). No
// connector at all keeps the endpoint open (a token is still required);
// NO_INGRESS, or a list without ALL_INGRESS, refuses it.
func ConnectorAccess(ingressConnectors []string) (ingress, shell bool) {
	has := func(name string) bool {
		return slices.ContainsFunc(ingressConnectors, func(a string) bool { return strings.HasSuffix(a, ":"+name) })
	}
	return len(ingressConnectors) == 0 || has(connAllIngress), has(connShellIngress)
}

const (
	connAllIngress   = "aws-network-connector:ALL_INGRESS"
	connShellIngress = "aws-network-connector:SHELL_INGRESS"
)

// Backend is the proxy's view of the VM engine and lifecycle controller.
type Backend interface {
	// Lookup returns routing facts for microVM id from memory or the state
	// store. It must not change the VM's state (a request with a valid
	// token but no ingress must not wake it). ErrNotFound if unknown or
	// terminated. Called once per request (the direct path's check may
	// add one for the first request of a connection to a VM it does not
	// serve: a route Dial or a TLS guest): keep it cheap.
	Lookup(ctx context.Context, id string) (Target, error)
	// EnsureRunning returns nil once the VM accepts connections. A RUNNING
	// VM returns at once. SUSPENDED with auto-resume: resume, then return.
	// SUSPENDING: wait for it, then resume. SUSPENDED without auto-resume:
	// ErrSuspended. Honours ctx (the request's, bounded by the proxy's
	// ResumeTimeout). Concurrent callers for one VM share one resume.
	EnsureRunning(ctx context.Context, id string) error
	// ConnOpened and ConnClosed bracket every proxied request, stream or
	// WebSocket; the VM is not idle while any is open, and ConnClosed marks
	// the time of last activity. ConnOpened comes before EnsureRunning, so
	// a VM just resumed for a request is not suspended under it.
	ConnOpened(id string)
	ConnClosed(id string)
}

// RunningNow is an optional Backend method for the common case, a VM
// that runs: it reports, from memory and without blocking, that id is
// RUNNING and that no suspend or terminate of it has begun. The proxy
// then skips EnsureRunning, whose timed wait (and, in the engine, store
// read) was the largest cost of a request to a running VM that the proxy
// itself adds. false only means "ask EnsureRunning"; it is asked after
// the token, the account and the ingress checks, as EnsureRunning is.
type RunningNow interface {
	RunningNow(id string) bool
}

// Authorizer checks tokens; *token.Signer implements it.
type Authorizer interface {
	Authorize(tok, microvmID string, kind token.Kind, port uint16) (token.Claims, error)
}

var _ Authorizer = (*token.Signer)(nil)

// Config for Server.
type Config struct {
	// Domain: endpoints are ID.Domain (e.g. microvm.localhost).
	Domain  string
	Backend Backend
	Tokens  Authorizer
	// Dial connects to a guest (default: net.Dialer with a 5s timeout).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// ResumeTimeout bounds EnsureRunning per request (default 60s).
	ResumeTimeout time.Duration
	// ShellHandler, if set, serves shell requests (port 8022) instead of
	// forwarding them to the guest; MicrovmID(r.Context()) names the VM.
	ShellHandler http.Handler
	// Envd, if set, serves E2B's envd on the host (see Envd).
	Envd   *Envd
	Logger *slog.Logger
}

// Server is an http.Handler for the endpoint listener.
type Server struct {
	cfg    Config
	h1, h2 *httputil.ReverseProxy
	// tls1 and tls2 re-encrypt to an app that serves TLS: HTTP/1.1 only
	// (upgrades), and h2 by ALPN with HTTP/1.1 as the fallback.
	tls1, tls2 *httputil.ReverseProxy
	// up carries the common plain-HTTP/1.1 request (upstream.go).
	up  *h1Upstream
	log *slog.Logger
	// running is cfg.Backend's RunningNow, if it has one.
	running RunningNow

	tlsMu    sync.Mutex
	tlsPorts map[string]tlsProbe // by upstream host:port

	// noDirect, set by tests only, sends every request the general way
	// (the direct path's differential test compares the two).
	noDirect atomic.Bool
}

// tlsProbe remembers whether a guest port spoke TLS, for a while: an app
// may be restarted with another listener.
type tlsProbe struct {
	tls bool
	at  time.Time
}

const (
	tlsProbeTTL     = 30 * time.Second
	tlsProbeTimeout = 2 * time.Second
	maxTLSProbes    = 4096 // bound the memo; a full one starts afresh
)

type ctxKey int

const (
	keyMicrovm ctxKey = iota
	keyAccount
	keyTarget
	keyProtocols
	keyRoute
	keyE2B    // the request named its sandbox E2B's way
	keyCancel // *reqCancel of a request on the own loops
)

// MicrovmID returns the microVM a request is routed to.
func MicrovmID(ctx context.Context) string { s, _ := ctx.Value(keyMicrovm).(string); return s }

// WithTarget names the microVM and its account for a host-side handler
// (ShellHandler, Envd.Handler) that another proxy already checked the
// request for: a cluster node serving what came through the edge's
// tunnel.
func WithTarget(ctx context.Context, microvmID, account string) context.Context {
	return context.WithValue(context.WithValue(ctx, keyMicrovm, microvmID), keyAccount, account)
}

// New builds the handler.
func New(cfg Config) (*Server, error) {
	if cfg.Domain == "" || cfg.Backend == nil || cfg.Tokens == nil {
		return nil, errors.New("proxy: domain, backend and tokens are required")
	}
	cfg.Domain = strings.ToLower(strings.TrimSuffix(cfg.Domain, "."))
	if cfg.Dial == nil {
		// Marked: the host table lets only marked connections into VMs.
		cfg.Dial = netns.HostDialer(5 * time.Second).DialContext
	}
	if cfg.ResumeTimeout <= 0 {
		cfg.ResumeTimeout = defaultResumeTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger, tlsPorts: map[string]tlsProbe{}}
	s.running, _ = cfg.Backend.(RunningNow)
	h1 := &http.Transport{
		DialContext:         s.dial,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
		// Guests answer slowly while resuming; the header wait is bounded by
		// the client's patience, not ours, so long polls work.
		ExpectContinueTimeout: time.Second,
	}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h2c := &http.Transport{
		DialContext:        s.dial,
		Protocols:          &p,
		IdleConnTimeout:    30 * time.Second,
		DisableCompression: true,
	}
	s.h1 = s.reverseProxy(h1)
	s.up = &h1Upstream{dial: s.dial}
	s.h2 = s.reverseProxy(h2c)
	// The app's certificate is its own (self-signed as a rule); like AWS's
	// proxy, kiln does not verify it: the hop is the host's private link
	// to the VM, and the app asked for TLS, not for a trust anchor.
	upTLS := func(protos ...string) *tls.Config {
		return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12, NextProtos: protos}
	}
	s.tls1 = s.reverseProxy(&http.Transport{
		DialContext: s.dial, TLSClientConfig: upTLS("http/1.1"), MaxIdleConnsPerHost: 64,
		IdleConnTimeout: 30 * time.Second, DisableCompression: true, ExpectContinueTimeout: time.Second,
	})
	s.tls2 = s.reverseProxy(&http.Transport{
		DialContext: s.dial, TLSClientConfig: upTLS("h2", "http/1.1"), ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64,
		IdleConnTimeout: 30 * time.Second, DisableCompression: true, ExpectContinueTimeout: time.Second,
	})
	return s, nil
}

func (s *Server) reverseProxy(t http.RoundTripper) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Transport: t,
		// 0, not -1: ReverseProxy already flushes every write of a stream
		// (text/event-stream, or no Content-Length, i.e. chunked/h2 streams),
		// and for bodies of known length a 4 KiB write buffer halves the
		// syscalls per small response (bench: 17% → 35% of direct
		// throughput on 2 cores). Nothing waits for a whole body either way.
		FlushInterval: 0,
		// Without a pool ReverseProxy allocates (and zeroes) 32 KiB per
		// response: the largest allocation of a small request in the
		// bench's CPU profile.
		BufferPool: copyBuffers,
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(pr.In.Context().Value(keyTarget).(*url.URL))
			pr.Out.Host = pr.In.Host
			forwardTrailers(pr)
			pr.SetXForwarded()
			stripProxyHeaders(pr.Out.Header)
			stripAuthCookie(pr.Out.Header)
			if protos := pr.Out.Header.Values(fieldWSProtocol); len(protos) > 0 {
				pr.Out.Header.Del(fieldWSProtocol)
				if rest := appProtocols(protos); len(rest) > 0 {
					pr.Out.Header.Set(fieldWSProtocol, strings.Join(rest, ", "))
				}
			}
		},
		ModifyResponse: func(resp *http.Response) error {
			if resp.StatusCode < 100 {
				return errLowStatus // Transport takes it; WriteHeader would panic
			}
			// A guest must not plant or overwrite the browser's token.
			dropSetCookie(resp.Header, CookieAuth)
			// A client that offered subprotocols must get one back, or
			// browsers fail the handshake ("Sent non-empty
			// 'Sec-WebSocket-Protocol' header but no response was
			// received"); the guest never saw the platform's, so when it
			// selects none, answer the platform's marker.
			if resp.StatusCode == http.StatusSwitchingProtocols && resp.Header.Get(fieldWSProtocol) == "" {
				offered, _ := resp.Request.Context().Value(keyProtocols).([]string)
				if echo := kilnProtocolEcho(offered); echo != "" {
					resp.Header.Set(fieldWSProtocol, echo)
				}
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.guestFailed(w, r, MicrovmID(r.Context()), err)
		},
	}
}

// forwardTrailers passes the client's declared request trailers on, less
// the fields no request header may carry to the guest either (the token,
// forwarding fields, one hop's), those whose values the proxy cuts the
// token out of as headers (Cookie, subprotocols: as trailers they are
// dropped whole), and those no trailer may be (Content-Length, Host...:
// the transport would refuse the request). They arrive in the incoming
// request's map once its body is read; Out's map is a copy made before
// that, which would send the names without values.
func forwardTrailers(pr *httputil.ProxyRequest) {
	in := pr.In.Trailer
	pr.Out.Trailer = nil
	if len(in) == 0 || pr.Out.Body == nil {
		return
	}
	out := http.Header{}
	for k := range in {
		k = http.CanonicalHeaderKey(k)
		if hopField(k) || droppedRequestField(k) || k == "Cookie" || k == fieldWSProtocol || !httpguts.ValidTrailerHeader(k) {
			continue
		}
		out[k] = nil
	}
	if len(out) > 0 {
		pr.Out.Trailer = out
		pr.Out.Body = &trailerBody{ReadCloser: pr.Out.Body, in: in, out: out}
	}
}

// trailerBody fills out's values from in once the body is read to its
// end, before the transport writes the trailers.
type trailerBody struct {
	io.ReadCloser
	in, out http.Header
}

func (b *trailerBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		for k := range b.out {
			b.out[k] = b.in.Values(k)
		}
	}
	return n, err
}

// guestFailed answers a request the guest did not answer.
func (s *Server) guestFailed(w http.ResponseWriter, r *http.Request, id string, err error) {
	if errors.Is(err, context.Canceled) {
		return // the client went away
	}
	if e2b, _ := r.Context().Value(keyE2B).(bool); e2b && errors.Is(err, ErrSuspended) {
		// A route's dial (a cluster edge's tunnel) found the sandbox
		// paused after the wake, which trusted a cached state: E2B's
		// answer, as wake gives it.
		e2bPaused(w, id)
		return
	}
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrSuspended) || errors.Is(err, ErrUnavailable) || errors.Is(err, errdefs.ErrExhausted) {
		// A Target.Dial found the VM gone, asleep or unable to wake after
		// Lookup: answered as if Lookup or EnsureRunning had said so.
		s.backendError(w, id, err)
		return
	}
	s.log.Warn("proxy: guest request failed", "microvm", id, "err", err)
	writeError(w, http.StatusBadGateway, "the microVM did not answer on this port")
}

// copyBuffers are ReverseProxy's body copy buffers, shared by all.
// A buffer holds the bytes of an earlier response; ReverseProxy only
// ever writes what it has just read into it.
var copyBuffers = &bufferPool{sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte  { return *b.p.Get().(*[]byte) }
func (b *bufferPool) Put(x []byte) { b.p.Put(&x) }

// ServeHTTP routes one request, counted by status class (internal/metrics).
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	cw := &countingWriter{ResponseWriter: w}
	s.serve(cw, r)
	countRequest(cw.code, cw.n, r.Context().Err())
}

// countRequest counts a request's status class and body bytes; code 0:
// the handler wrote nothing (200), or the client left first (499).
func countRequest(code int, n int64, ctxErr error) {
	if code == 0 {
		code = http.StatusOK
		if ctxErr != nil {
			code = 499
		}
	}
	c := classCounters(code)
	c.requests.Inc()
	c.bytes.Add(float64(n))
}

// statusCounters are one status class's request and byte counters, made
// on first use and kept: WithLabelValues hashes the label on every call.
type statusCounters struct{ requests, bytes prometheus.Counter }

var classes [6]atomic.Pointer[statusCounters] // 1xx..5xx at 1..5, "other" at 0

func classCounters(code int) *statusCounters {
	i := code / 100
	if code < 100 || code > 599 {
		i = 0
	}
	if c := classes[i].Load(); c != nil {
		return c
	}
	cl := metrics.Class(code)
	c := &statusCounters{metrics.ProxyRequests.WithLabelValues(cl), metrics.ProxyBytes.WithLabelValues(cl)}
	classes[i].Store(c)
	return c
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	id, ok := s.microvmFromHost(r.Host)
	e2bID, e2bPort, e2b, err := s.e2bRoute(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if e2b {
		id, ok = e2bID, true
		if s.cfg.Envd != nil && e2bPort == s.cfg.Envd.Port {
			s.serveEnvd(w, r, id)
			return
		}
	}
	if !ok {
		writeError(w, http.StatusNotFound, "unknown endpoint host")
		return
	}
	protos := r.Header.Values(fieldWSProtocol)
	if r.Method == http.MethodGet && hasQueryAuth(r.URL.RawQuery) {
		s.tokenToCookie(w, r, id)
		return
	}
	port, tok, err := requestPortAndToken(r, protos)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if e2b {
		port = e2bPort
	}
	if s.cfg.Envd != nil && port == s.cfg.Envd.Port {
		// Reserved for envd, whichever way it is addressed: an endpoint
		// token (allPorts included) never reaches a guest on it.
		s.serveEnvd(w, r, id)
		return
	}
	kind := token.KindEndpoint
	if port == ShellPort {
		kind = token.KindShell
	}
	var claims token.Claims
	through := false
	if tok == "" && e2b {
		var done bool
		if through, done = s.e2bTraffic(w, r, id, port); done {
			return
		}
	}
	if !through {
		if tok == "" {
			writeError(w, http.StatusUnauthorized, "missing "+HeaderAuth+" token")
			return
		}
		if claims, err = s.cfg.Tokens.Authorize(tok, id, kind, port); refuseToken(w, err) {
			return
		}
	}
	r.Header.Del(HeaderE2BTrafficToken) // a token never reaches the guest
	ctx := r.Context()
	tgt, err := s.cfg.Backend.Lookup(ctx, id)
	if err != nil {
		s.backendError(w, id, err)
		return
	}
	if claims.Account != "" && tgt.Account != "" && claims.Account != tgt.Account {
		writeError(w, http.StatusForbidden, "token does not grant this microVM or port")
		return
	}
	if kind == token.KindShell && !tgt.Shell {
		writeError(w, http.StatusForbidden, "shell ingress is not enabled for this microVM")
		return
	}
	if kind == token.KindEndpoint && !tgt.Ingress {
		writeError(w, http.StatusForbidden, "ingress is not enabled for this microVM")
		return
	}

	s.cfg.Backend.ConnOpened(id)
	defer s.cfg.Backend.ConnClosed(id)
	if !s.wake(ctx, w, id, e2b) {
		return
	}

	ctx = context.WithValue(ctx, keyMicrovm, id)
	if e2b {
		ctx = context.WithValue(ctx, keyE2B, true)
	}
	if kind == token.KindShell && s.cfg.ShellHandler != nil {
		s.cfg.ShellHandler.ServeHTTP(w, r.WithContext(ctx))
		return
	}
	s.forward(ctx, w, r, id, tgt, port, protos)
}

// forward sends a checked request on to port of the guest tgt (or, with
// tgt.Dial, of whatever serves that port for the route, such as a node's
// tunnel).
func (s *Server) forward(ctx context.Context, w http.ResponseWriter, r *http.Request, id string, tgt Target, port uint16, protos []string) {
	host := netip.AddrPortFrom(tgt.Addr, port).String()
	if tgt.Dial != nil {
		rd := &routeDial{host: routeHost(tgt.Route, port), port: port, dial: tgt.Dial}
		host = rd.host
		ctx = context.WithValue(ctx, keyRoute, rd)
	}
	u := &url.URL{Scheme: "http", Host: host}
	if s.speaksTLS(ctx, host) {
		// AWS: "The proxy auto-detects whether your server speaks TLS and
		// adjusts (re-encrypt for end-to-end TLS ...)".
		u.Scheme = "https"
		rp := s.tls2
		if isUpgrade(r) {
			rp = s.tls1
		}
		rp.ServeHTTP(w, r.WithContext(reverseProxyCtx(ctx, u, protos)))
		return
	}
	rp := s.h1
	switch {
	case r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc"):
		rp = s.h2 // gRPC needs HTTP/2 end to end (trailers, bidi streams)
	case forceH2(r.Header) && !isUpgrade(r):
		// AWS: "X-aws-proxy-force-h2: true" forces h2c to the upstream.
		// An upgrade (WebSocket) has no h2c form, so it stays HTTP/1.1.
		rp = s.h2
	}
	if rp == s.h1 && fastPathOK(r) {
		if tgt.Dial != nil {
			r = r.WithContext(ctx) // the route's dial; a local guest saves the copy
		}
		s.forwardH1(w, r, id, u)
		return
	}
	rp.ServeHTTP(w, r.WithContext(reverseProxyCtx(ctx, u, protos)))
}

// reverseProxyCtx carries what ReverseProxy's Rewrite and ModifyResponse
// read; only its requests get it (the fast path spares the allocations).
func reverseProxyCtx(ctx context.Context, target *url.URL, protos []string) context.Context {
	return context.WithValue(context.WithValue(ctx, keyTarget, target), keyProtocols, protos)
}

// wake makes the VM runnable for a request (auto-resume), or answers the
// request with why it cannot be. The caller has counted the connection
// open (Backend.ConnOpened), so the VM is not idled under it.
func (s *Server) wake(ctx context.Context, w http.ResponseWriter, id string, e2b bool) bool {
	return wake(ctx, w, id, e2b, s.cfg.Backend.EnsureRunning, s.running, s.cfg.ResumeTimeout, s.log)
}

func wake(ctx context.Context, w http.ResponseWriter, id string, e2b bool, ensure func(context.Context, string) error,
	running RunningNow, timeout time.Duration, log *slog.Logger) bool {
	if running != nil && running.RunningNow(id) {
		return true
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	start := time.Now()
	err := ensure(rctx, id)
	cancel()
	if waited := time.Since(start); waited > autoResumeFloor && err == nil {
		// Only a request that waited for its VM: a RUNNING one returns at
		// once and would drown the histogram in zeros.
		metrics.AutoResume.Observe(waited.Seconds())
	}
	if err != nil && e2b && errors.Is(err, ErrSuspended) {
		e2bPaused(w, id)
		return false
	}
	if err != nil {
		backendError(w, log, id, err)
		return false
	}
	return true
}

// Waker is what WakeFirst needs of a backend (the VM engine).
type Waker interface {
	RunningNow
	EnsureRunning(ctx context.Context, id string) error
}

// WakeFirst serves a host port's handler h (the shell's, envd's) behind
// another proxy's checks, as a cluster node's end of the edge's tunnel
// does: each request first wakes the microVM MicrovmID names, as this
// proxy's own requests do, with E2B's answer for a paused sandbox when
// e2b is set. The other proxy woke it before it opened the connection,
// but it keeps that connection for later requests, and trusts its own
// view of the VM's state, which a suspend elsewhere makes stale.
func WakeFirst(b Waker, e2b bool, log *slog.Logger, h http.Handler) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if wake(r.Context(), w, MicrovmID(r.Context()), e2b, b.EnsureRunning, b, defaultResumeTimeout, log) {
			h.ServeHTTP(w, r)
		}
	})
}

// speaksTLS reports whether the app at upstream host:port answers a TLS
// handshake. The answer is kept for tlsProbeTTL. A port that answers
// neither (nothing listens, or it keeps silent) counts as plaintext, as
// before.
func (s *Server) speaksTLS(ctx context.Context, host string) bool {
	s.tlsMu.Lock()
	p, ok := s.tlsPorts[host]
	s.tlsMu.Unlock()
	if ok && time.Since(p.at) < tlsProbeTTL {
		return p.tls
	}
	pctx, cancel := context.WithTimeout(ctx, tlsProbeTimeout)
	defer cancel()
	yes := false
	if c, err := s.dial(pctx, "tcp", host); err == nil {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
		yes = tc.HandshakeContext(pctx) == nil
		tc.Close()
		if ctx.Err() != nil {
			return yes // the request ended: the probe's "no" may be that, not the app
		}
	} else {
		return false // do not remember: the app may be starting
	}
	s.tlsMu.Lock()
	if len(s.tlsPorts) >= maxTLSProbes {
		clear(s.tlsPorts)
	}
	s.tlsPorts[host] = tlsProbe{tls: yes, at: time.Now()}
	s.tlsMu.Unlock()
	return yes
}

func (s *Server) backendError(w http.ResponseWriter, id string, err error) {
	backendError(w, s.log, id, err)
}

func backendError(w http.ResponseWriter, log *slog.Logger, id string, err error) {
	switch {
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, "microVM not found")
	case errors.Is(err, ErrSuspended):
		writeError(w, http.StatusServiceUnavailable, "microVM is suspended and autoResumeEnabled is false")
	case errors.Is(err, context.Canceled):
	case errors.Is(err, context.DeadlineExceeded):
		writeError(w, http.StatusGatewayTimeout, "timed out waiting for the microVM to resume")
	case errors.Is(err, errdefs.ErrExhausted):
		// Host admission refused the resume; the message names the memory
		// committed, requested and allowed.
		w.Header().Set("Retry-After", "10")
		writeError(w, http.StatusServiceUnavailable, "microVM cannot resume now: "+err.Error())
	default:
		log.Warn("proxy: backend", "microvm", id, "err", err)
		writeError(w, http.StatusServiceUnavailable, "microVM unavailable")
	}
}

// hostOnly is host without its port, if it has one. SplitHostPort alone
// would allocate an error for every Host without a port, the common one.
func hostOnly(host string) string {
	if strings.IndexByte(host, ':') < 0 {
		return host
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		return h
	}
	return host
}

// microvmFromHost extracts ID from "ID.DOMAIN[:port]".
func (s *Server) microvmFromHost(host string) (string, bool) {
	host = hostOnly(host)
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	id, ok := strings.CutSuffix(host, "."+s.cfg.Domain)
	if !ok || id == "" || strings.Contains(id, ".") {
		return "", false
	}
	return id, true
}

// hasQueryAuth reports whether a query carries QueryAuth. Parsing every
// query costs a map per request; a query that holds neither the name nor
// a percent escape (which could spell it) cannot carry it.
func hasQueryAuth(raw string) bool {
	if raw == "" || !strings.Contains(raw, QueryAuth) && !strings.Contains(raw, "%") {
		return false
	}
	q, _ := url.ParseQuery(raw)
	return q.Has(QueryAuth)
}

// requestPortAndToken reads the guest port and the token from the headers
// or, for WebSocket clients that cannot set headers, the subprotocols.
func requestPortAndToken(r *http.Request, protos []string) (uint16, string, error) {
	portText := r.Header.Get(fieldPort)
	tok := r.Header.Get(fieldAuth)
	for _, p := range splitProtocols(protos) {
		if v, ok := strings.CutPrefix(p, SubprotoAuth); ok && tok == "" {
			tok = v
		} else if v, ok := strings.CutPrefix(p, SubprotoPort); ok && portText == "" {
			portText = v
		}
	}
	if tok == "" {
		if c, err := r.Cookie(CookieAuth); err == nil {
			tok = c.Value
		}
	}
	port := uint16(DefaultPort)
	if portText != "" {
		n, err := strconv.ParseUint(portText, 10, 16)
		if err != nil || n == 0 {
			return 0, "", fmt.Errorf("bad %s %q", HeaderPort, portText)
		}
		port = uint16(n)
	}
	if len(tok) > token.MaxLen {
		return 0, "", errors.New("token too long")
	}
	return port, tok, nil
}

// tokenToCookie answers a link carrying an endpoint token (?kiln-proxy-auth=):
// a valid token for this microVM's port 8080 becomes an HttpOnly, Secure
// cookie of this host only, and the browser is sent to the same URL
// without the token. An invalid one is refused as a header token would be.
func (s *Server) tokenToCookie(w http.ResponseWriter, r *http.Request, id string) {
	q := r.URL.Query()
	tok := q.Get(QueryAuth)
	if len(tok) > token.MaxLen {
		writeError(w, http.StatusBadRequest, "token too long")
		return
	}
	claims, err := s.cfg.Tokens.Authorize(tok, id, token.KindEndpoint, DefaultPort)
	if refuseToken(w, err) {
		return
	}
	q.Del(QueryAuth)
	u := *r.URL
	u.RawQuery = q.Encode()
	u.Scheme, u.Host = "", ""
	if u.Path == "" {
		u.Path = "/"
	}
	// Lax: the cookie must go with the top-level navigation from the
	// console (another site); no Domain, so sibling endpoints never get it.
	http.SetCookie(w, &http.Cookie{Name: CookieAuth, Value: tok, Path: "/", Expires: claims.Expiry(),
		HttpOnly: true, Secure: true, SameSite: http.SameSiteLaxMode})
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Referrer-Policy", "no-referrer")
	http.Redirect(w, r, u.String(), http.StatusSeeOther)
}

// stripAuthCookie removes CookieAuth from a request's Cookie headers.
func stripAuthCookie(h http.Header) {
	vals := h.Values("Cookie")
	if len(vals) == 0 {
		return
	}
	var keep []string
	for _, v := range vals {
		for p := range cookiesWithoutAuth(v) {
			keep = append(keep, p)
		}
	}
	h.Del("Cookie")
	if len(keep) > 0 {
		h.Set("Cookie", strings.Join(keep, "; "))
	}
}

// cookiesWithoutAuth yields the trimmed cookies of a Cookie field's
// value v but CookieAuth: what reaches the guest on both paths
// (stripAuthCookie, reqHead.writeHead).
func cookiesWithoutAuth(v string) iter.Seq[string] {
	return func(yield func(string) bool) {
		for part := range strings.SplitSeq(v, ";") {
			// Trimmed around the name as net/http's cookie reader trims it:
			// "kiln-proxy-auth =tok" is the token cookie to the proxy too.
			name, _, _ := strings.Cut(part, "=")
			if p := strings.TrimSpace(part); p != "" && strings.TrimSpace(name) != CookieAuth && !yield(p) {
				return
			}
		}
	}
}

// dropSetCookie removes the guest's Set-Cookie headers for name.
func dropSetCookie(h http.Header, name string) {
	vals := h.Values("Set-Cookie")
	if len(vals) == 0 {
		return
	}
	h.Del("Set-Cookie")
	for _, v := range vals {
		if !setsCookie(v, name) {
			h.Add("Set-Cookie", v)
		}
	}
}

// setsCookie reports whether a Set-Cookie value v sets cookie name,
// also as a nameless cookie: browsers store "=name=x" (or "=name") under
// an empty name and send it back as "name=x", which reads as name.
func setsCookie(v, name string) bool {
	pair, _, _ := strings.Cut(v, ";")
	n, rest, _ := strings.Cut(pair, "=")
	if n = strings.TrimSpace(n); n == "" {
		n, _, _ = strings.Cut(rest, "=")
		n = strings.TrimSpace(n)
	}
	return strings.EqualFold(n, name)
}

func splitProtocols(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func isKilnProtocol(p string) bool {
	return p == SubprotoBase || strings.HasPrefix(p, SubprotoAuth) || strings.HasPrefix(p, SubprotoPort)
}

// stripProxyHeaders removes every header of the x-aws-proxy-* namespace
// (AWS: "Unrecognized x-aws-proxy-* headers are stripped before
// forwarding"), the token first of all.
func stripProxyHeaders(h http.Header) {
	for k := range h {
		if proxyField(k) {
			delete(h, k)
		}
	}
}

// proxyField: k is in the x-aws-proxy-* namespace, in any case.
func proxyField(k string) bool {
	return len(k) >= len(headerPrefix) && strings.EqualFold(k[:len(headerPrefix)], headerPrefix)
}

func forceH2(h http.Header) bool {
	return strings.EqualFold(strings.TrimSpace(h.Get(fieldForceH2)), "true")
}

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" || r.Method == http.MethodConnect
}

// appProtocols drops kiln's subprotocols: the guest never sees the token.
func appProtocols(vals []string) []string {
	var out []string
	for _, p := range splitProtocols(vals) {
		if !isKilnProtocol(p) {
			out = append(out, p)
		}
	}
	return out
}

// kilnProtocolEcho picks the platform subprotocol to answer when the
// guest selected none: the bare marker if offered (what AWS's browser
// example offers first), else the port one, else the auth one. "" if
// the client offered none of the platform's.
func kilnProtocolEcho(vals []string) string {
	var base, auth, port string
	for _, p := range splitProtocols(vals) {
		switch {
		case p == SubprotoBase:
			base = p
		case strings.HasPrefix(p, SubprotoPort):
			port = p
		case strings.HasPrefix(p, SubprotoAuth):
			auth = p
		}
	}
	for _, p := range []string{base, port, auth} {
		if p != "" {
			return p
		}
	}
	return ""
}

// autoResumeFloor separates a request that waited for a resume from one
// whose VM was running (a store read).
const autoResumeFloor = 20 * time.Millisecond

// defaultResumeTimeout bounds EnsureRunning per request (Config.ResumeTimeout).
const defaultResumeTimeout = 60 * time.Second

// countingWriter records the status and counts body bytes. It unwraps
// (http.ResponseController) and passes Flush and Hijack through, so
// streams and WebSockets work as before.
type countingWriter struct {
	http.ResponseWriter
	code int
	n    int64
}

func (c *countingWriter) WriteHeader(code int) {
	if c.code == 0 || c.code < 200 {
		c.code = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.code == 0 {
		c.code = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (c *countingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if c.code == 0 {
		c.code = http.StatusSwitchingProtocols
	}
	return http.NewResponseController(c.ResponseWriter).Hijack()
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func writeError(w http.ResponseWriter, code int, msg string) {
	metrics.ProxyErrors.WithLabelValues(metrics.Class(code)).Inc()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"message": msg})
}

// Serve runs the endpoint on ln with TLS from tlsConfig (which must offer
// "h2" in NextProtos for HTTP/2) until ctx ends; then it shuts down,
// giving open requests shutdownGrace.
func (s *Server) Serve(ctx context.Context, ln net.Listener, tlsConfig *tls.Config, shutdownGrace time.Duration) error {
	tc := tlsConfig.Clone()
	if !slices.Contains(tc.NextProtos, "http/1.1") {
		tc.NextProtos = append(tc.NextProtos, "http/1.1")
	}
	fb := newConnListener(ln.Addr())
	// net/http serves what the own HTTP/1.1 loop hands over (h1loop.go:
	// upgrades, Expect, HTTP/1.0); h2 has a loop of its own (h2loop.go).
	srv := &http.Server{
		Handler:           withConnTLS(s),
		TLSConfig:         tc,
		ConnContext:       connContext,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	hs := &h1Serve{s: s, handler: s, direct: s, tlsConf: tc, fallback: fb, conns: map[net.Conn]*h1Conn{}}
	go srv.Serve(fb)
	errc := make(chan error, 1)
	go func() { errc <- hs.accept(ln) }()
	stop := func(grace time.Duration) {
		hs.closing.Store(true)
		ln.Close()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), grace)
		defer cancel()
		done := make(chan struct{})
		go func() { hs.shutdown(sctx); close(done) }()
		srv.Shutdown(sctx)
		<-done
	}
	select {
	case err := <-errc:
		stop(0)
		return err
	case <-ctx.Done():
		stop(shutdownGrace)
		return nil
	}
}

// refuseToken answers a token that Authorize refused and reports whether
// it did; the header and the browser link are refused in the same words.
func refuseToken(w http.ResponseWriter, err error) bool {
	switch {
	case errors.Is(err, token.ErrScope):
		writeError(w, http.StatusForbidden, "token does not grant this microVM or port")
	case errors.Is(err, token.ErrExpired):
		writeError(w, http.StatusUnauthorized, "token expired")
	case err != nil:
		writeError(w, http.StatusUnauthorized, "invalid token")
	default:
		return false
	}
	return true
}
