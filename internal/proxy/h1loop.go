package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The endpoint serves the common HTTP/1.1 request on its own connection
// loop (h1Conn) instead of net/http's server: net/http starts a
// background read after every request header and aborts it when the
// handler ends, two goroutine wake-ups per request that on 2 busy cores
// made most of the gap to nginx (docs/ARCHITECTURE.md, "Endpoint
// proxy"). The plain request takes the direct path (direct.go) when it
// may; every other one is parsed (own parser or http.ReadRequest) and
// handed to the same Server.ServeHTTP, so the token check, routing and
// header stripping are the ones every other request gets. Anything
// unusual (an upgrade, Expect, HTTP/1.0, h2 by ALPN) goes to net/http's
// server with the bytes already read replayed in front of the connection.

const (
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = 120 * time.Second
	// bodyReadTimeout bounds each read of a request body (net/http's
	// server had none): a client that stops sending mid-body is dropped.
	bodyReadTimeout = 120 * time.Second
	// writeTimeout bounds each write to the client (net/http's server has
	// none by default): a client that stops reading an answer frees its
	// goroutine and the guest's connection, and the VM may go idle, as on
	// the h2 loop (h2WriteTimeout).
	writeTimeout   = 60 * time.Second
	maxHeaderBytes = 64 << 10
	// headerReadLimit is what the header read may take from the
	// connection: the header plus what bufio reads ahead (net/http's rule).
	headerReadLimit = maxHeaderBytes + 4096
	// maxBodyDrain is how much of a request body the handler left unread
	// is read to keep the connection (net/http reads 256 KiB).
	maxBodyDrain = 256 << 10
	// pendMax is how much of a response body waits for the handler's end
	// before the header goes out: a small answer gets a Content-Length
	// and leaves in one write with its header.
	pendMax = 8 << 10
	// writeBufSize holds a header and pendMax of body: one TLS record,
	// one write, for the common answer.
	writeBufSize = 16 << 10
)

// h1Serve accepts ln's connections: TLS handshake, then h2 to the own h2
// loop and HTTP/1.1 to the own h1 loop.
type h1Serve struct {
	s *Server
	// handler is s, but for the loop's own tests; direct is s where the
	// direct path (direct.go) serves what it can, nil in those tests.
	handler  http.Handler
	direct   *Server
	tlsConf  *tls.Config
	fallback *connListener
	closing  atomic.Bool
	// writeTimeout, if set, replaces writeTimeout (tests).
	writeTimeout time.Duration

	mu sync.Mutex
	// conns are the connections this loop owns: nil while in the TLS
	// handshake, then their h1Conn. Those handed to net/http leave.
	conns map[net.Conn]*h1Conn
	// h2 are the connections on the own HTTP/2 loop (h2loop.go), also in
	// conns (with a nil *h1Conn) for the last resort of shutdown.
	h2 map[net.Conn]*h2Conn
	wg sync.WaitGroup
}

func (hs *h1Serve) accept(ln net.Listener) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if hs.closing.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		hs.mu.Lock()
		if hs.closing.Load() {
			hs.mu.Unlock()
			c.Close()
			return nil
		}
		hs.conns[c] = nil
		hs.wg.Add(1)
		hs.mu.Unlock()
		go hs.handshake(c)
	}
}

func (hs *h1Serve) handshake(c net.Conn) {
	defer hs.wg.Done()
	defer hs.untrack(c)
	tc := tls.Server(c, hs.tlsConf)
	tc.SetDeadline(time.Now().Add(readHeaderTimeout))
	if err := tc.HandshakeContext(context.Background()); err != nil {
		hs.s.log.Debug("proxy: TLS handshake", "remote", c.RemoteAddr().String(), "err", err)
		c.Close()
		return
	}
	tc.SetDeadline(time.Time{})
	st := tc.ConnectionState()
	if st.NegotiatedProtocol == "h2" {
		hs.serveH2(c, tc, &st)
		return
	}
	hc := &h1Conn{hs: hs, conn: tc, raw: c, state: &st, remote: c.RemoteAddr().String()}
	if ip, _, err := net.SplitHostPort(hc.remote); err == nil {
		hc.remoteIP = ip
	}
	hs.mu.Lock()
	hs.conns[c] = hc
	hs.mu.Unlock()
	hc.serve()
}

// handoff gives net/http's server the connection raw (whose TLS conn is
// hc), so its Shutdown, not ours, ends it.
func (hs *h1Serve) handoff(raw, hc net.Conn) {
	hs.untrack(raw)
	if !hs.fallback.push(hc) {
		raw.Close()
	}
}

func (hs *h1Serve) untrack(c net.Conn) {
	hs.mu.Lock()
	delete(hs.conns, c)
	hs.mu.Unlock()
}

// shutdown wakes idle connections (their loop ends), lets requests in
// flight finish until ctx ends, then closes what is left.
func (hs *h1Serve) shutdown(ctx context.Context) {
	hs.closing.Store(true)
	hs.mu.Lock()
	for _, hc := range hs.conns {
		if hc != nil && hc.idle.Load() {
			hc.conn.SetReadDeadline(aLongTimeAgo)
		}
	}
	for _, c := range hs.h2 {
		go c.shutdown() // it writes a GOAWAY: not under hs.mu
	}
	hs.mu.Unlock()
	done := make(chan struct{})
	go func() { hs.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		hs.mu.Lock()
		for c := range hs.conns {
			c.Close()
		}
		hs.mu.Unlock()
		<-done
	}
}

var aLongTimeAgo = time.Unix(1, 0)

// h1Conn is one client connection on the own loop.
type h1Conn struct {
	hs *h1Serve
	// conn is the client's TLS connection; raw the TCP one under it.
	conn   net.Conn
	raw    net.Conn
	state  *tls.ConnectionState
	remote string
	// remoteIP is remote's address, for the direct path's X-Forwarded-For.
	remoteIP string
	idle     atomic.Bool

	// head and the field arrays are the direct path's, reused request
	// after request.
	head      reqHead
	fields    []hfield
	rfields   []hfield
	toGeneral atomic.Pointer[generalMemo] // directRoute's memo

	rec recorder
	lim io.LimitedReader
	br  *bufio.Reader
	bw  *bufio.Writer // writes through tw
	tw  timedWriter

	// The watch notices a client that leaves while its request waits for
	// the guest (a long poll, a quiet stream) and ends the request's
	// context, as net/http's background read does; it starts only for a
	// request still running after watchDelay, so the common one costs a
	// timer reset, not two goroutine wake-ups.
	watchT    *time.Timer
	watchMu   sync.Mutex
	watchOn   bool // a request is running and may be watched
	watching  bool
	watchDone chan struct{}
	watchCtx  *reqCancel
	watchBody *reqBody
}

const watchDelay = 250 * time.Millisecond

// watch runs from watchT: it reads the connection until the client
// sends something (kept for the next request) or leaves (the request's
// context ends).
func (c *h1Conn) watch() {
	c.watchMu.Lock()
	if !c.watchOn || c.watchBody != nil && !c.watchBody.sawEOF.Load() {
		// The request body is still being read; its reads fail when the
		// client leaves.
		c.watchMu.Unlock()
		return
	}
	// Cleared under the lock: unwatch sets its past deadline after it, so
	// the read below cannot miss its stop (it would block until the
	// client's next request, which waits for this answer).
	c.conn.SetReadDeadline(time.Time{})
	c.watching = true
	done := make(chan struct{})
	c.watchDone = done
	rc := c.watchCtx
	c.watchMu.Unlock()
	defer close(done)
	var b [1]byte
	n, err := c.conn.Read(b[:])
	if n > 0 {
		c.rec.pre = append(c.rec.pre, b[0])
		return
	}
	if !isTimeout(err) {
		rc.cancel()
	}
}

// unwatch ends the watch of the request that just finished.
func (c *h1Conn) unwatch() {
	c.watchT.Stop()
	c.watchMu.Lock()
	c.watchOn = false
	watching, done := c.watching, c.watchDone
	c.watching, c.watchDone, c.watchCtx, c.watchBody = false, nil, nil, nil
	c.watchMu.Unlock()
	if watching {
		c.conn.SetReadDeadline(aLongTimeAgo)
		<-done
	}
}

// recorder sits between the connection and the header read: while on, it
// keeps every byte read, so a request handed to net/http can be replayed
// and a request's raw header checked. pre is served before the connection.
type recorder struct {
	r   io.Reader
	on  bool
	buf []byte
	pre []byte // read by the watch, not yet by the loop
}

func (r *recorder) Read(p []byte) (n int, err error) {
	if len(r.pre) > 0 {
		n = copy(p, r.pre)
		r.pre = r.pre[:copy(r.pre, r.pre[n:])]
	} else {
		n, err = r.r.Read(p)
	}
	if r.on && n > 0 {
		r.buf = append(r.buf, p[:n]...)
	}
	return n, err
}

func (c *h1Conn) serve() {
	c.rec.r = c.conn
	c.lim.R = &c.rec
	c.lim.N = math.MaxInt64
	c.br = bufio.NewReaderSize(&c.lim, 4096)
	c.watchT = time.AfterFunc(time.Hour, c.watch)
	c.watchT.Stop()
	for {
		keep, handoff := c.one()
		if handoff != nil {
			c.hs.handoff(c.raw, handoff)
			return
		}
		if !keep || c.hs.closing.Load() {
			c.conn.Close()
			return
		}
	}
}

var writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writeBufSize) }}

// errHeaderTooLarge: the header read hit headerReadLimit.
var errHeaderTooLarge = errors.New("request header too large")

// one serves one request. keep: the connection can read another;
// handoff: the connection (with the bytes read replayed) for net/http.
func (c *h1Conn) one() (keep bool, handoff net.Conn) {
	c.idle.Store(true)
	c.conn.SetReadDeadline(time.Now().Add(idleTimeout))
	if c.hs.closing.Load() {
		return false, nil
	}
	if _, err := c.br.Peek(1); err != nil {
		return false, nil
	}
	c.idle.Store(false)
	// The write buffer is the connection's only while it serves: an idle
	// keep-alive connection holds none.
	c.bw = writers.Get().(*bufio.Writer)
	c.tw.conn, c.tw.timeout = c.conn, writeTimeout
	if c.hs.writeTimeout > 0 {
		c.tw.timeout = c.hs.writeTimeout
	}
	c.bw.Reset(&c.tw)
	defer func() {
		c.bw.Reset(nil)
		writers.Put(c.bw)
		c.bw = nil
		if cap(c.rec.buf) > 16<<10 {
			c.rec.buf = nil // a rare huge header does not stay
		}
	}()
	c.conn.SetReadDeadline(time.Now().Add(readHeaderTimeout))
	buffered, _ := c.br.Peek(c.br.Buffered())
	if d, n, ok := parseReqHead(buffered, c.fields[:0]); ok {
		c.fields = d.fields[:0]
		c.head = d
		// checkRequest finds nothing else wrong in what parseReqHead takes.
		if c.hs.direct != nil && validHost(d.host) {
			if keep, handled := c.direct(&c.head, n); handled {
				return keep, nil
			}
		}
		if r, ok := c.head.request(); ok {
			if msg := checkRequest(r, buffered[:n]); msg != "" {
				c.refuse(http.StatusBadRequest, msg)
				return false, nil
			}
			c.br.Discard(n)
			c.conn.SetReadDeadline(time.Time{})
			return c.run(r), nil
		}
	}
	c.rec.buf = append(c.rec.buf[:0], buffered...)
	c.rec.on = true
	c.lim.N = headerReadLimit
	r, err := http.ReadRequest(c.br)
	c.rec.on = false
	if err != nil {
		if c.lim.N <= 0 {
			c.refuse(http.StatusRequestHeaderFieldsTooLarge, errHeaderTooLarge.Error())
		} else if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !isTimeout(err) {
			c.refuse(http.StatusBadRequest, err.Error())
		}
		return false, nil
	}
	c.lim.N = math.MaxInt64
	if r.ProtoMajor != 1 || r.ProtoMinor != 1 || isUpgrade(r) || len(r.Header["Expect"]) > 0 {
		return false, &replayConn{Conn: c.conn, pre: append(bytes.Clone(c.rec.buf), c.rec.pre...), state: c.state}
	}
	if msg := checkRequest(r, c.rec.buf); msg != "" {
		c.refuse(http.StatusBadRequest, msg)
		return false, nil
	}
	c.conn.SetReadDeadline(time.Time{})
	return c.run(r), nil
}

// checkRequest refuses what net/http's server refuses after the parse,
// and a request with both Content-Length and Transfer-Encoding (RFC 9112
// 6.3: a proxy must not forward one; http.ReadRequest silently drops the
// length). raw holds the request's bytes from its first.
func checkRequest(r *http.Request, raw []byte) string {
	// http.ReadRequest refused a repeated Host and took it out of Header.
	if !rawHasField(raw, "host") || !validHost(r.Host) {
		return "missing or invalid Host header"
	}
	for k, vv := range r.Header {
		if !validFieldName(k) {
			return "invalid header name"
		}
		for _, v := range vv {
			if !validFieldValue(v) {
				return "invalid header value"
			}
		}
	}
	if len(r.TransferEncoding) > 0 && rawHasField(raw, "content-length") {
		return "both Content-Length and Transfer-Encoding"
	}
	return ""
}

// rawHasField reports whether the header in raw (up to its empty line)
// has a field named name (lower case).
func rawHasField(raw []byte, name string) bool {
	end := bytes.Index(raw, []byte("\r\n\r\n"))
	if end < 0 {
		end = len(raw)
	}
	head := raw[:end]
	for len(head) > 0 {
		i := bytes.IndexByte(head, '\n')
		line := head
		if i >= 0 {
			line, head = head[:i], head[i+1:]
		} else {
			head = nil
		}
		k, _, ok := bytes.Cut(line, []byte(":"))
		if ok && len(k) == len(name) && bytes.EqualFold(bytes.TrimSpace(k), []byte(name)) {
			return true
		}
	}
	return false
}

func validFieldName(k string) bool {
	if k == "" {
		return false
	}
	for _, c := range []byte(k) {
		if c <= ' ' || c >= 0x7f || bytes.IndexByte([]byte("\"(),/:;<=>?@[\\]{}"), c) >= 0 {
			return false
		}
	}
	return true
}

func validFieldValue(v string) bool {
	for _, c := range []byte(v) {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// refuse answers a request the loop will not serve and ends the
// connection, as net/http's server answers a malformed one.
func (c *h1Conn) refuse(code int, msg string) {
	c.tw.own(time.Now().Add(time.Second))
	c.bw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) +
		"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n")
	c.bw.WriteString(strconv.Itoa(code) + " " + http.StatusText(code) + ": " + msg)
	c.bw.Flush()
}

type connCtxKey struct{}

// run hands r to the Server and finishes the response; it reports
// whether the connection can serve another request.
func (c *h1Conn) run(r *http.Request) (keep bool) {
	w := &h1Writer{c: c, response: response{h: make(http.Header, 8), cl: -1}}
	defer w.rc.cancel()
	r = r.WithContext(w.rc.context())
	r.RemoteAddr = c.remote
	r.TLS = c.state
	var body *reqBody
	if r.Body != nil && r.Body != http.NoBody {
		body = &reqBody{rc: r.Body, c: c}
		r.Body = body
	}
	w.body, w.req = body, r
	c.watchMu.Lock()
	c.watchOn, c.watchCtx, c.watchBody = true, &w.rc, body
	c.watchMu.Unlock()
	c.watchT.Reset(watchDelay)
	aborted := c.call(w, r)
	c.unwatch()
	if aborted {
		if body != nil {
			body.close()
		}
		return false
	}
	// The answer first: a client may wait for it before sending the rest
	// of a body the handler did not want.
	w.finish()
	if w.deadlined {
		c.tw.release()
	}
	keep = !w.closeAfter && w.err == nil && !r.Close
	if body != nil && !body.finish(keep) {
		keep = false
	}
	return keep
}

// call runs the handler; a panic (http.ErrAbortHandler included) ends the
// connection without finishing the response, as net/http does.
func (c *h1Conn) call(w *h1Writer, r *http.Request) (aborted bool) {
	return guard(c.hs.s.log, c.remote, func() { c.hs.handler.ServeHTTP(w, r) })
}

// guard runs f, a handler's work; a panic in it (http.ErrAbortHandler
// included) is reported as aborted, and logged unless it is that one.
func guard(log *slog.Logger, remote string, f func()) (aborted bool) {
	defer func() {
		if v := recover(); v != nil {
			aborted = true
			if v != http.ErrAbortHandler {
				buf := make([]byte, 16<<10)
				buf = buf[:runtime.Stack(buf, false)]
				log.Error("proxy: handler panic", "remote", remote, "panic", v, "stack", string(buf))
			}
		}
	}()
	f()
	return false
}

// reqBody is a request body read on the connection's goroutine or, by
// http.Transport, on another; after finish, reads fail (a late reader
// never takes the next request's bytes).
type reqBody struct {
	mu     sync.Mutex
	rc     io.ReadCloser
	c      *h1Conn
	done   bool
	sawEOF atomic.Bool
	n      atomic.Int64 // bytes read
	// deadline set by the handler (ResponseController.SetReadDeadline);
	// zero: each read gets bodyReadTimeout.
	deadline time.Time
}

func (b *reqBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return 0, http.ErrBodyReadAfterClose
	}
	if b.sawEOF.Load() {
		return 0, io.EOF
	}
	d := b.deadline
	if d.IsZero() {
		d = time.Now().Add(bodyReadTimeout)
	}
	b.c.conn.SetReadDeadline(d)
	n, err := b.rc.Read(p)
	b.n.Add(int64(n))
	if err == io.EOF {
		b.sawEOF.Store(true)
	}
	return n, err
}

func (b *reqBody) Close() error { return nil }

// finish closes the body to late readers and, when the connection is to
// serve on, reads what the handler left of it (up to maxBodyDrain); false:
// the connection cannot serve again.
func (b *reqBody) finish(keep bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done = true
	if b.sawEOF.Load() {
		return true
	}
	if !keep {
		return false
	}
	b.c.conn.SetReadDeadline(time.Now().Add(time.Second))
	n, err := io.CopyN(io.Discard, b.rc, maxBodyDrain+1)
	return err == io.EOF && n <= maxBodyDrain
}

func (b *reqBody) close() {
	b.mu.Lock()
	b.done = true
	b.mu.Unlock()
}

// tooLong reports whether more than maxBodyDrain of the body is unread
// (or its length unknown): the connection will close after the answer.
func (b *reqBody) tooLong(declared int64) bool {
	return !b.sawEOF.Load() && (declared < 0 || declared-b.n.Load() > maxBodyDrain)
}

// h1Writer is the http.ResponseWriter of the own loop. The header waits
// for the handler's end or pendMax body bytes, so a small answer gets a
// Content-Length and leaves with its header in one write; a longer or
// flushed one of unknown length is chunked.
type h1Writer struct {
	c    *h1Conn
	body *reqBody // nil: none
	rc   reqCancel
	response

	chunked    bool
	closeAfter bool
	err        error
	trailers   []string
	// deadlined: the handler set a write deadline, which run clears
	// after the answer, as net/http does, so that it does not cut a later
	// request's answer on the same connection.
	deadlined bool
}

// response is what the writers of both connection loops (h1Writer,
// h2Writer) keep of an answer: its status and declared length, and the
// body bytes held back with the header until the handler ends or
// pendMax of them wait.
type response struct {
	req     *http.Request
	h       http.Header
	status  int // 0 until WriteHeader
	sent    bool
	noBody  bool
	cl      int64 // declared Content-Length, -1 none
	written int64
	pend    []byte
}

// final takes the handler's final status and its declared length.
func (r *response) final(code int) {
	r.status = code
	if v := r.h.Get("Content-Length"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 {
			r.cl = n
		} else {
			delete(r.h, "Content-Length")
		}
	}
	r.noBody = r.req.Method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified
}

// hold accounts for body bytes p. done: Write returns n and err now (p
// was dropped, refused or held back with the header); otherwise the
// caller sends the header, if it has not, and then p.
func (r *response) hold(p []byte) (done bool, n int, err error) {
	if r.noBody {
		if r.req.Method == http.MethodHead {
			return true, len(p), nil
		}
		return true, 0, http.ErrBodyNotAllowed
	}
	if r.cl >= 0 && r.written+int64(len(p)) > r.cl {
		return true, 0, http.ErrContentLength
	}
	r.written += int64(len(p))
	if !r.sent && len(r.pend)+len(p) <= pendMax {
		if r.pend == nil {
			r.pend = pendBuffers.Get().(*[pendMax]byte)[:0]
		}
		r.pend = append(r.pend, p...)
		return true, len(p), nil
	}
	return false, 0, nil
}

func (w *h1Writer) Header() http.Header { return w.h }

func (w *h1Writer) WriteHeader(code int) {
	if w.status != 0 || w.err != nil {
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code < 200 {
		// Informational (103 Early Hints): out at once, final one follows.
		w.writeStatus(code)
		w.writeFields(w.h)
		w.c.bw.WriteString("\r\n")
		w.fail(w.c.bw.Flush())
		return
	}
	w.final(code)
}

func (w *h1Writer) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if done, n, err := w.hold(p); done {
		return n, err
	}
	if !w.sent {
		w.sendHeader(false)
	}
	w.writeBody(p)
	if w.err != nil {
		return 0, w.err
	}
	return len(p), nil
}

var pendBuffers = sync.Pool{New: func() any { return new([pendMax]byte) }}

func (w *h1Writer) writeBody(p []byte) {
	if len(p) == 0 || w.err != nil {
		return
	}
	bw := w.c.bw
	if w.chunked {
		bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		bw.WriteString("\r\n")
		bw.Write(p)
		_, err := bw.WriteString("\r\n")
		w.fail(err)
		return
	}
	_, err := bw.Write(p)
	w.fail(err)
}

// fail records a write error: the client is gone, so the request's
// context ends (the guest's connection is freed) and the connection too.
func (w *h1Writer) fail(err error) {
	if err != nil && w.err == nil {
		w.err = err
		w.rc.cancel()
	}
}

func (w *h1Writer) FlushError() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return w.err
	}
	if !w.sent {
		w.sendHeader(false)
	}
	w.fail(w.c.bw.Flush())
	return w.err
}

func (w *h1Writer) Flush() { w.FlushError() }

// EnableFullDuplex: the loop reads a request body and writes the answer
// independently already.
func (w *h1Writer) EnableFullDuplex() error { return nil }

func (w *h1Writer) SetReadDeadline(t time.Time) error {
	if b, ok := w.req.Body.(*reqBody); ok {
		b.mu.Lock()
		b.deadline = t
		b.mu.Unlock()
	}
	return w.c.conn.SetReadDeadline(t)
}

func (w *h1Writer) SetWriteDeadline(t time.Time) error {
	w.deadlined = true
	return w.c.tw.own(t)
}

// timedWriter is a client connection's writer (HTTP/1.1 and h2 loops):
// each write pushes the write deadline timeout on, at most once a second (a write may
// take 59 s to 60 s), unless a deadline of its own was set (own).
type timedWriter struct {
	conn    net.Conn
	timeout time.Duration
	owned   bool
	at      time.Time // when the deadline was last pushed on
}

func (t *timedWriter) Write(p []byte) (int, error) {
	if now := time.Now(); !t.owned && now.Sub(t.at) > time.Second {
		t.conn.SetWriteDeadline(now.Add(t.timeout))
		t.at = now
	}
	return t.conn.Write(p)
}

// own sets the deadline d (zero: none), which writes then keep.
func (t *timedWriter) own(d time.Time) error {
	t.owned, t.at = true, time.Time{}
	return t.conn.SetWriteDeadline(d)
}

// release drops a deadline set by own: writes push writeTimeout on again.
func (t *timedWriter) release() {
	t.owned, t.at = false, time.Time{}
	t.conn.SetWriteDeadline(time.Time{})
}

// sendHeader writes the status line and header; final: the handler has
// returned, so the whole body is in pend.
func (w *h1Writer) sendHeader(final bool) {
	w.sent = true
	h := w.h
	delete(h, "Transfer-Encoding")
	for _, v := range h["Connection"] {
		if hasToken([]string{v}, "close") {
			w.closeAfter = true
		}
	}
	delete(h, "Connection")
	if w.req.Close || w.c.hs.closing.Load() || w.body != nil && w.body.tooLong(w.req.ContentLength) {
		w.closeAfter = true
	}
	for _, v := range h["Trailer"] {
		for _, k := range splitProtocols([]string{v}) {
			w.trailers = append(w.trailers, http.CanonicalHeaderKey(k))
		}
	}
	hasTrailerPrefix := hasTrailerPrefix(h)
	bodyOK := !w.noBody
	if w.status == http.StatusNoContent || w.status == http.StatusNotModified {
		delete(h, "Content-Length")
	}
	if bodyOK {
		sniffType(h, w.pend)
		switch {
		case w.cl >= 0:
		case final && len(w.trailers) == 0 && !hasTrailerPrefix:
			w.cl = int64(len(w.pend))
			h["Content-Length"] = []string{strconv.Itoa(len(w.pend))}
		default:
			w.chunked = true
		}
	}
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{httpDate()}
	}
	w.writeStatus(w.status)
	w.writeFields(h)
	if w.chunked {
		w.c.bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if w.closeAfter {
		w.c.bw.WriteString("Connection: close\r\n")
	}
	_, err := w.c.bw.WriteString("\r\n")
	w.fail(err)
	if len(w.pend) > 0 {
		pend := w.pend
		w.pend = nil
		w.writeBody(pend)
		pendBuffers.Put((*[pendMax]byte)(pend[:pendMax]))
	}
}

func (w *h1Writer) writeStatus(code int) {
	bw := w.c.bw
	bw.WriteString("HTTP/1.1 ")
	bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(code), 10)) // Itoa allocates for codes over 99
	bw.WriteByte(' ')
	if t := http.StatusText(code); t != "" {
		bw.WriteString(t)
	} else {
		bw.WriteString("status code " + strconv.Itoa(code))
	}
	bw.WriteString("\r\n")
}

// writeFields writes a header; names that are not tokens and line
// breaks in values never reach the client (a guest's header cannot
// split the response).
func (w *h1Writer) writeFields(h http.Header) {
	bw := w.c.bw
	for k, vv := range h {
		if !validFieldName(k) {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(sanitizeFieldValue(v))
			bw.WriteString("\r\n")
		}
	}
}

// finish completes the response after the handler returned and writes it
// out.
func (w *h1Writer) finish() {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return
	}
	if !w.sent {
		w.sendHeader(true)
	}
	if w.pend != nil {
		pendBuffers.Put((*[pendMax]byte)(w.pend[:pendMax]))
		w.pend = nil
	}
	if w.chunked {
		bw := w.c.bw
		bw.WriteString("0\r\n")
		tr := trailerFields(w.h, w.trailers)
		delete(tr, "Content-Length")
		delete(tr, "Transfer-Encoding")
		delete(tr, "Trailer")
		w.writeFields(tr)
		bw.WriteString("\r\n")
	} else if !w.noBody && w.cl >= 0 && w.written < w.cl {
		// The handler declared more than it wrote: the client must not
		// wait for bytes that never come, nor read the next answer as them.
		w.closeAfter = true
	}
	w.fail(w.c.bw.Flush())
}

// httpDate is the Date header, formatted once a second.
func httpDate() string {
	now := time.Now().Unix()
	if d := dateCache.Load(); d != nil && d.at == now {
		return d.s
	}
	d := &cachedDate{at: now, s: time.Unix(now, 0).UTC().Format(http.TimeFormat)}
	dateCache.Store(d)
	return d.s
}

type cachedDate struct {
	at int64
	s  string
}

var dateCache atomic.Pointer[cachedDate]

// replayConn is a client connection handed to net/http: pre (the bytes
// the loop read) comes first.
type replayConn struct {
	net.Conn
	pre   []byte
	state *tls.ConnectionState
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// connListener gives net/http's server the connections the loop does
// not serve.
type connListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func newConnListener(addr net.Addr) *connListener {
	return &connListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }

// withConnTLS gives a replayed connection's requests their TLS state
// (net/http sets Request.TLS only for a *tls.Conn).
func withConnTLS(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			if st, ok := r.Context().Value(connCtxKey{}).(*tls.ConnectionState); ok {
				r.TLS = st
			}
		}
		h.ServeHTTP(w, r)
	})
}

func connContext(ctx context.Context, c net.Conn) context.Context {
	if rc, ok := c.(*replayConn); ok {
		return context.WithValue(ctx, connCtxKey{}, rc.state)
	}
	return ctx
}
