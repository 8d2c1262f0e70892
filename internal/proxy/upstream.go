package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"
)

// h1Upstream sends the common request (no body, no upgrade) to a guest
// that speaks plain HTTP/1.1 on the handler's own goroutine: it writes
// the request and reads the answer on a kept-alive connection itself.
// http.Transport hands every request to a writer goroutine and every
// answer back from a reader goroutine; on 2 busy cores those two
// wake-ups per request were a large part of the proxy's added latency
// (bench: CPU profile of `kiln bench proxy`). Requests with a body,
// upgrades, h2c and TLS guests still go through httputil.ReverseProxy.
type h1Upstream struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	mu       sync.Mutex
	idle     map[string][]*upConn // by guest host:port, most recent last
	nIdle    int
	sweeping bool
}

// upConn is one kept-alive connection to a guest. lim bounds what the
// response header may read from the guest.
type upConn struct {
	c net.Conn
	// The request's cancellation watch: rc for a request on the own
	// loops, else stop, context.AfterFunc's.
	rc   *reqCancel
	stop func() bool
	// breakOff ends a blocked read or write: made once, not per request.
	breakOff func()
	body     lengthBody
	lim      io.LimitedReader
	br       *bufio.Reader
	bw       *bufio.Writer
	idleAt   time.Time
	peek     peeker // upAlive's, made on first use
}

const (
	upIdleTimeout    = 30 * time.Second // as the Transports' IdleConnTimeout
	upMaxIdlePerHost = 256
	upMaxIdle        = 1024
	// upMaxHeader bounds a guest's response header, as http.Transport's
	// default MaxResponseHeaderBytes does.
	upMaxHeader = 10 << 20
)

var errUpstreamProtocol = errors.New("the app answered 101 Switching Protocols to a request that asked for no upgrade")

// max1xx bounds the informational answers before the final one, as
// http.Transport does: a guest could otherwise send them forever.
const max1xx = 5

var (
	errTooMany1xx = fmt.Errorf("the app sent more than %d informational (1xx) answers before its answer", max1xx)
	errLowStatus  = errors.New("the app answered with a status code below 100 (HTTP status codes are 100 to 999)")
)

// fastPathOK reports whether r can take h1Upstream: no body (a length
// of 0 is no body, for ReverseProxy too, also for an HTTP/2 stream whose
// body is open), nothing to wait for (Expect), no protocol switch.
func fastPathOK(r *http.Request) bool {
	return r.ContentLength == 0 && len(r.TransferEncoding) == 0 && len(r.Trailer) == 0 &&
		r.Header.Get("Expect") == "" && !isUpgrade(r)
}

func (u *h1Upstream) get(addr string) *upConn {
	u.mu.Lock()
	defer u.mu.Unlock()
	for l := u.idle[addr]; len(l) > 0; l = u.idle[addr] {
		pc := l[len(l)-1]
		u.idle[addr] = l[:len(l)-1]
		u.nIdle--
		if time.Since(pc.idleAt) < upIdleTimeout {
			return pc
		}
		pc.c.Close()
	}
	return nil
}

func (u *h1Upstream) put(addr string, pc *upConn) {
	pc.idleAt = time.Now()
	u.mu.Lock()
	if len(u.idle[addr]) >= upMaxIdlePerHost || u.nIdle >= upMaxIdle {
		u.mu.Unlock()
		pc.c.Close()
		return
	}
	if u.idle == nil {
		u.idle = map[string][]*upConn{}
	}
	u.idle[addr] = append(u.idle[addr], pc)
	u.nIdle++
	start := !u.sweeping
	u.sweeping = true
	u.mu.Unlock()
	if start {
		go u.sweep()
	}
}

// release ends pc's exchange: back to the pool if it can serve another
// (reuse, and its request was not cancelled), else closed.
func (u *h1Upstream) release(addr string, pc *upConn, reuse bool) {
	if pc.unwatch() && reuse {
		u.put(addr, pc)
	} else {
		pc.c.Close()
	}
}

// closeIdle closes every idle connection.
func (u *h1Upstream) closeIdle() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, l := range u.idle {
		for _, pc := range l {
			pc.c.Close()
		}
	}
	clear(u.idle)
	u.nIdle = 0
}

// sweep closes connections idle for upIdleTimeout (a guest that got no
// request since keeps no descriptor of ours) and ends when none is left.
func (u *h1Upstream) sweep() {
	for {
		time.Sleep(upIdleTimeout / 3)
		u.mu.Lock()
		for addr, l := range u.idle {
			keep := l[:0]
			for _, pc := range l {
				if time.Since(pc.idleAt) < upIdleTimeout {
					keep = append(keep, pc)
				} else {
					pc.c.Close()
					u.nIdle--
				}
			}
			clear(l[len(keep):])
			if len(keep) == 0 {
				delete(u.idle, addr)
			} else {
				u.idle[addr] = keep
			}
		}
		if u.nIdle == 0 {
			u.sweeping = false
			u.mu.Unlock()
			return
		}
		u.mu.Unlock()
	}
}

func (u *h1Upstream) dialConn(ctx context.Context, addr string) (*upConn, error) {
	c, err := u.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	pc := &upConn{c: c, bw: bufio.NewWriter(c)}
	pc.breakOff = func() { c.SetDeadline(aLongTimeAgo) }
	pc.lim.R, pc.lim.N = c, math.MaxInt64
	pc.br = bufio.NewReader(&pc.lim)
	return pc, nil
}

// headWriter writes a bodyless request's head to the guest: an
// *outRequest (the general path's http.Request) or a *reqHead (the
// direct path's client head, direct.go).
type headWriter interface {
	writeHead(bw *bufio.Writer) error
}

// outRequest is an http.Request as a headWriter (a conversion of the
// pointer: no allocation).
type outRequest http.Request

func (o *outRequest) writeHead(bw *bufio.Writer) error { return writeHead(bw, (*http.Request)(o)) }

// roundTrip writes out on a kept-alive connection (or a new one) and
// reads the response header. Until pc.unwatch is called, ctx ending
// breaks the connection (a client that left a stream frees the guest's
// connection at once).
func (u *h1Upstream) roundTrip(ctx context.Context, addr string, out *http.Request) (*http.Response, *upConn, error) {
	pc, err := u.send(ctx, addr, out.Method, false, (*outRequest)(out))
	if err != nil {
		return nil, nil, err
	}
	resp, err := pc.readResponse(out)
	if err != nil {
		return nil, nil, pc.fail(ctx, err)
	}
	return resp, pc, nil
}

// send writes a request's head (and a small body: the direct path's) on
// a kept-alive connection (or a new one) and waits for the first byte of
// the answer. A kept connection is used only when a non-blocking peek
// finds it open and quiet (upAlive), as Transport's reader closes one the
// guest closed while idle or sent to unasked ("Unsolicited response
// received on idle HTTP channel"): bytes a guest writes after an answer
// (a body for HEAD, a second answer) would otherwise answer the next
// request, another user's. One the guest closes between the peek and the
// send fails before any answer: an idempotent request without a body is
// then sent once more on a new connection, as Transport does; a body is
// never sent twice (Transport does not replay a request whose body has
// no GetBody: ReverseProxy's), nor is a request of another method.
func (u *h1Upstream) send(ctx context.Context, addr, method string, body bool, hw headWriter) (*upConn, error) {
	once := body || !isIdempotent(method)
	pc := u.get(addr)
	// Bytes already read past the last answer (a body sent to HEAD or
	// after a 204, more than Content-Length said) count as unasked too.
	for pc != nil && (pc.br.Buffered() > 0 || !upAlive(pc)) {
		pc.c.Close()
		pc = u.get(addr)
	}
	if pc != nil {
		err := pc.send(ctx, hw)
		if err == nil {
			return pc, nil
		}
		if ctx.Err() != nil || once || !errors.Is(err, errNoAnswer) {
			return nil, err
		}
	}
	pc, err := u.dialConn(ctx, addr)
	if err != nil {
		return nil, err
	}
	if err := pc.send(ctx, hw); err != nil {
		return nil, err
	}
	return pc, nil
}

var errNoAnswer = errors.New("the app closed the connection without an answer")

// send writes the head and waits for the answer's first byte; on an
// error the connection is closed. The answer's header may read
// upMaxHeader bytes until readResponse or headRead.
func (pc *upConn) send(ctx context.Context, hw headWriter) error {
	pc.watch(ctx)
	if err := hw.writeHead(pc.bw); err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			// A head over the writer's buffer met a connection the guest
			// closed after the peek: as a failed Flush, nothing was answered.
			err = fmt.Errorf("%w: %w", errNoAnswer, err)
		}
		return pc.fail(ctx, err)
	}
	if err := pc.bw.Flush(); err != nil {
		return pc.fail(ctx, fmt.Errorf("%w: %w", errNoAnswer, err))
	}
	pc.lim.N = upMaxHeader
	if _, err := pc.br.Peek(1); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			err = fmt.Errorf("%w: %w", errNoAnswer, err)
		}
		return pc.fail(ctx, err)
	}
	return nil
}

// fail closes a connection whose exchange failed: the request's end, if
// that was the cause, else err.
func (pc *upConn) fail(ctx context.Context, err error) error {
	pc.unwatch()
	pc.c.Close()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if pc.lim.N <= 0 {
		return fmt.Errorf("response header over %d bytes", upMaxHeader)
	}
	return err
}

// headRead lifts the header's limit off the body.
func (pc *upConn) headRead() { pc.lim.N = math.MaxInt64 }

// watch ties pc to ctx: ctx ending breaks the connection off.
func (pc *upConn) watch(ctx context.Context) {
	if rc, ok := ctx.Value(keyCancel).(*reqCancel); ok {
		pc.rc = rc
		rc.watch(pc.c)
		return
	}
	pc.rc = nil
	pc.stop = context.AfterFunc(ctx, pc.breakOff)
}

// unwatch ends watch; false: ctx ended, the connection may be broken.
func (pc *upConn) unwatch() bool {
	if rc := pc.rc; rc != nil {
		pc.rc = nil
		return rc.unwatch()
	}
	return pc.stop()
}

// readResponse reads the answer's header: the common one with
// parseResponseHead from what the connection has buffered, anything else
// with http.ReadResponse.
func (pc *upConn) readResponse(out *http.Request) (*http.Response, error) {
	buf, _ := pc.br.Peek(pc.br.Buffered())
	resp, n, ok := parseResponseHead(buf, out.Method)
	if !ok {
		resp, err := http.ReadResponse(pc.br, out)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode < 100 {
			// No writer takes it (WriteHeader panics): a bad answer.
			return nil, errLowStatus
		}
		pc.headRead()
		return resp, nil
	}
	pc.br.Discard(n)
	pc.headRead()
	resp.Request = out
	if resp.ContentLength > 0 {
		// The connection serves one answer at a time: its body is read
		// to the end (or the connection closed) before the next exchange.
		pc.body = lengthBody{r: pc.br, n: resp.ContentLength}
		resp.Body = &pc.body
	}
	return resp, nil
}

// writeHead writes a bodyless request's line and header as
// Request.Write writes them (Host first, no empty User-Agent, line
// breaks in values turned to spaces, "Content-Length: 0" for the
// methods that expect one), without its fmt calls: those were a fifth
// of this path's CPU in the bench profile.
func writeHead(bw *bufio.Writer, out *http.Request) error {
	if !validHost(out.Host) {
		return fmt.Errorf("invalid Host %q", out.Host)
	}
	bw.WriteString(out.Method)
	bw.WriteByte(' ')
	bw.WriteString(out.URL.RequestURI())
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(out.Host)
	bw.WriteString("\r\n")
	for k, vv := range out.Header {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		}
		for _, v := range vv {
			if k == "User-Agent" && v == "" {
				continue
			}
			if strings.ContainsAny(v, "\r\n") {
				v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
			}
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(strings.Trim(v, " \t"))
			bw.WriteString("\r\n")
		}
	}
	if zeroLengthMethod(out.Method) {
		bw.WriteString("Content-Length: 0\r\n")
	}
	_, err := bw.WriteString("\r\n")
	return err
}

// zeroLengthMethod: a bodyless request of these methods says
// "Content-Length: 0", as Request.Write says it.
func zeroLengthMethod(m string) bool {
	return m == http.MethodPost || m == http.MethodPut || m == http.MethodPatch
}

// validHost: printable ASCII without space or the characters no
// host[:port] has (what net/http's ValidHostHeader allows, in short);
// never a line break.
func validHost(h string) bool {
	if h == "" {
		return false
	}
	for _, c := range []byte(h) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"<>\\^`{|}", c) >= 0 {
			return false
		}
	}
	return true
}

func isIdempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// hopField: the fields of one hop (RFC 9110 7.6.1) that a proxy must
// not forward either way, the list httputil.ReverseProxy removes. k is
// canonical.
func hopField(k string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// droppedRequestField: a client's field that never reaches the guest as
// sent (k canonical): one hop's, kiln's x-aws-proxy-* namespace (the
// token first of all), E2B's traffic token, and the forwarding fields
// the proxy sets itself (a client cannot plant them). Both the general
// path (outgoing) and the direct one (reqHead.writeHead) ask this, so
// they cannot drift; the Cookie's token part and kiln's subprotocols
// are cut from their values (cookiesWithoutAuth, appProtocols).
func droppedRequestField(k string) bool {
	switch k {
	case "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", HeaderE2BTrafficToken:
		return true
	}
	return hopField(k) || proxyField(k)
}

// droppedAnswerField: a guest's answer field that never reaches the
// client: one hop's, and a Set-Cookie for the token cookie (a guest must
// not plant or overwrite the browser's token).
func droppedAnswerField(k, v string) bool {
	return hopField(k) || k == "Set-Cookie" && setsCookie(v, CookieAuth)
}

func removeHopHeaders(h http.Header) {
	for _, f := range h["Connection"] {
		for _, sf := range strings.Split(f, ",") {
			if sf = textprotoTrim(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	for k := range h {
		if hopField(k) {
			delete(h, k)
		}
	}
}

func textprotoTrim(s string) string { return strings.Trim(s, " \t") }

// hasToken reports whether a comma-separated header holds token (any
// case), as ReverseProxy decides whether to forward "Te: trailers".
func hasToken(vals []string, token string) bool {
	for _, v := range vals {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(textprotoTrim(t), token) {
				return true
			}
		}
	}
	return false
}

// outgoing is the request to the guest, built as ReverseProxy with
// s.h1's Rewrite builds it: hop-by-hop headers out, the client's
// Forwarded/X-Forwarded-* replaced by ours,
// every x-aws-proxy-* header, the token cookie and kiln's WebSocket
// subprotocols removed, Host kept.
//
// own: r comes from the own loops (h1Conn, h2Conn), which never read its
// header again: it becomes the guest's, which spares a map per request.
func outgoing(r *http.Request, target *url.URL, own bool) *http.Request {
	conn, te := r.Header["Connection"], r.Header["Te"]
	var h http.Header
	if own {
		h = r.Header
		for k := range h {
			if droppedRequestField(k) {
				delete(h, k)
			}
		}
	} else {
		h = make(http.Header, len(r.Header)+3)
		for k, vv := range r.Header {
			if !droppedRequestField(k) {
				h[k] = vv // values are replaced, never appended to in place, below
			}
		}
	}
	// And the fields the client named in Connection.
	for _, f := range conn {
		for _, sf := range strings.Split(f, ",") {
			if sf = textprotoTrim(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	if hasToken(te, "trailers") {
		h["Te"] = []string{"trailers"}
	}
	// One array for the three values (cap 1 each: an append copies).
	xf := new([3]string)
	// Only the address kiln saw: ReverseProxy drops the client's own
	// X-Forwarded-For before SetXForwarded, so a client cannot plant one.
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		xf[0] = ip
		h["X-Forwarded-For"] = xf[0:1:1]
	}
	xf[1] = r.Host
	h["X-Forwarded-Host"] = xf[1:2:2]
	xf[2] = "http"
	if r.TLS != nil {
		xf[2] = "https"
	}
	h["X-Forwarded-Proto"] = xf[2:3:3]
	stripAuthCookie(h)
	if protos := h.Values(fieldWSProtocol); len(protos) > 0 {
		// The canonical key: h's keys are; wsProtocolField is not, and
		// deleting it left the field, kiln's token in it, to the guest.
		delete(h, fieldWSProtocol)
		if rest := appProtocols(protos); len(rest) > 0 {
			h.Set(fieldWSProtocol, strings.Join(rest, ", "))
		}
	}
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = []string{""} // no Go default on the app's side
	}
	u := *r.URL
	u.Scheme, u.Host = target.Scheme, target.Host
	u.RawQuery = cleanQuery(u.RawQuery)
	out := &http.Request{Method: r.Method, URL: &u, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Host: r.Host}
	return out
}

// cleanQuery re-encodes a query that the proxy would read differently
// from the app (semicolons, bad escapes), as ReverseProxy does.
func cleanQuery(s string) string {
	for i := 0; i < len(s); {
		switch s[i] {
		case ';':
			v, _ := url.ParseQuery(s)
			return v.Encode()
		case '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				v, _ := url.ParseQuery(s)
				return v.Encode()
			}
			i += 3
		default:
			i++
		}
	}
	return s
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// forwardH1 proxies a fastPathOK request to a plain-HTTP guest over
// h1Upstream, answering as ReverseProxy with s.h1 answers.
func (s *Server) forwardH1(w http.ResponseWriter, r *http.Request, id string, target *url.URL) {
	ctx := r.Context()
	_, own := ctx.Value(keyCancel).(*reqCancel)
	out := outgoing(r, target, own)
	resp, pc, err := s.up.roundTrip(ctx, target.Host, out)
	if err != nil {
		s.guestFailed(w, r, id, err)
		return
	}
	s.answerH1(ctx, w, r, id, out, resp, pc, target.Host)
}

// answerH1 passes the guest's answer resp to out (read on pc, from the
// guest at addr) on to the client, as ReverseProxy with s.h1 passes it,
// and keeps pc for the next request if it can serve one. r is the
// client's request (for guestFailed).
func (s *Server) answerH1(ctx context.Context, w http.ResponseWriter, r *http.Request, id string, out *http.Request,
	resp *http.Response, pc *upConn, addr string) {
	var err error
	reuse := false
	defer func() { s.up.release(addr, pc, reuse) }()
	// Informational answers (103 Early Hints) go on to the client, as
	// ReverseProxy passes them; the final answer follows.
	for n := 1; resp.StatusCode >= 100 && resp.StatusCode < 200; n++ {
		if resp.StatusCode == http.StatusSwitchingProtocols {
			s.guestFailed(w, r, id, errUpstreamProtocol)
			return
		}
		if n > max1xx {
			s.guestFailed(w, r, id, errTooMany1xx)
			return
		}
		h := w.Header()
		removeHopHeaders(resp.Header)
		copyHeaders(h, resp.Header)
		w.WriteHeader(resp.StatusCode)
		clear(h)
		pc.lim.N = upMaxHeader // each head within the bound, as the first
		if resp, err = pc.readResponse(out); err != nil {
			s.guestFailed(w, r, id, err)
			return
		}
	}
	removeHopHeaders(resp.Header)
	dropSetCookie(resp.Header, CookieAuth)
	h := w.Header()
	copyHeaders(h, resp.Header)
	if n := len(resp.Trailer); n > 0 {
		keys := make([]string, 0, n)
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		h.Add("Trailer", strings.Join(keys, ", "))
	}
	w.WriteHeader(resp.StatusCode)
	if err := copyBody(w, resp, streaming(resp)); err != nil {
		resp.Body.Close()
		if errors.Is(err, errClientWrite) || ctx.Err() != nil {
			return
		}
		// The guest broke off mid-body: abort the client's response so it
		// does not take a truncated body for a whole one.
		panic(http.ErrAbortHandler)
	}
	resp.Body.Close()
	if len(resp.Trailer) > 0 {
		http.NewResponseController(w).Flush()
		for k, vv := range resp.Trailer {
			for _, v := range vv {
				h.Add(http.TrailerPrefix+k, v)
			}
		}
	}
	reuse = !resp.Close && !out.Close && ctx.Err() == nil
}

// copyHeaders adds src (a parsed answer's header: canonical keys, read
// no more) to dst. A key dst lacks takes src's slice itself, not a
// copy: dst's users replace or append to values, and an append to a
// slice at its capacity copies it (those of parseResponseHead are).
func copyHeaders(dst, src http.Header) {
	for k, vv := range src {
		if old, ok := dst[k]; ok {
			dst[k] = append(old, vv...)
		} else {
			dst[k] = vv
		}
	}
}

// streaming: an event stream, or a body of unknown length, is flushed
// write by write (ReverseProxy's rule).
func streaming(resp *http.Response) bool {
	if resp.ContentLength == -1 {
		return true
	}
	// The media type without parameters, as mime.ParseMediaType reads it
	// (that parse, on every answer, cost more than the rest of this).
	ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
	return strings.EqualFold(strings.TrimSpace(ct), "text/event-stream")
}

var errClientWrite = errors.New("writing to the client")

// copyBody copies the guest's body to the client, through a pooled
// buffer, reading to the end (so the connection can serve again).
func copyBody(w http.ResponseWriter, resp *http.Response, flush bool) error {
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	rc := http.NewResponseController(w)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return fmt.Errorf("%w: %w", errClientWrite, err)
			}
			if flush {
				if err := rc.Flush(); err != nil {
					return fmt.Errorf("%w: %w", errClientWrite, err)
				}
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}
