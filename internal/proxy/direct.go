package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// The direct path (issue 15): the common request on the h1 loop goes to
// the guest without ever becoming an http.Request or an http.Header.
// net/http's request and header model (the request's map, its copy for
// the guest, the writer's map, the answer's map, their strings) was most
// of the ~100 allocations and of the user CPU per request that kept the
// proxy behind nginx. The request's head, as parseReqHead read it into
// fields that are slices of one string, is written to the guest field by
// field, and the guest's answer head, as parseRespHead read it, to the
// client.
//
// Eligible is only what is plain (directRoute): anything else takes the
// general path (Server.ServeHTTP) unchanged, which also answers every
// refusal, so the checks here only ever say "direct" or "not here". The
// checks are serve()'s, in its order, and free of effects until the
// request is taken: Authorize and Lookup, then ConnOpened, then wake.
// What is stripped on the way is decided by the same functions on both
// paths (droppedRequestField, cookiesWithoutAuth, droppedAnswerField), and
// TestDirectSameAsGeneral sends a set of plain and hostile requests
// through both and compares what the guest and the client get.

// directRoute reports whether d may take the direct path, and to which
// microVM and guest address: a kiln endpoint host (not E2B's), a token
// (the one header field, else the token cookie as r.Cookie reads it:
// cookieToken) that Authorize accepts for an endpoint port that is
// neither the shell's nor envd's, the Lookup target's account and
// ingress agreeing, a local guest (no route Dial) known to speak plain
// HTTP, and nothing the general path treats specially (subprotocols, Te,
// force-h2, E2B headers, the query token link, a URI net/url rewrites).
// The VM must run (RunningNow); wake is still asked after ConnOpened, as
// serve asks it.
//
// general remembers a host and port whose target takes the general path
// for good (a route Dial, a TLS guest), so that later requests on the
// connection skip the checks here and Lookup stays once a request.
func (s *Server) directRoute(ctx context.Context, d *reqHead, general *atomic.Pointer[generalMemo]) (id, addr string, ok bool) {
	if s.noDirect.Load() || s.running == nil || !plainURI(d.uri) {
		return "", "", false
	}
	if id, ok = s.microvmFromHost(d.host); !ok {
		return "", "", false
	}
	if p, rest, cut := strings.Cut(id, "-"); cut && rest != "" && allDigits(p) {
		return "", "", false // E2B's "PORT-ID" host
	}
	var tok, portText string
	var nTok, nPort int
	for _, f := range d.fields {
		switch f.k {
		case fieldAuth:
			tok, nTok = f.v, nTok+1
		case fieldPort:
			portText, nPort = f.v, nPort+1
		case fieldWSProtocol, "Te", fieldForceH2, HeaderE2BSandboxID:
			return "", "", false
		}
	}
	if nTok > 1 || nPort > 1 {
		return "", "", false
	}
	if m := general.Load(); m != nil && m.host == d.host && m.port == portText {
		return "", "", false
	}
	if tok == "" { // as requestPortAndToken: no (or an empty) header token, the cookie's
		if tok, ok = cookieToken(d.fields); !ok {
			return "", "", false
		}
	}
	if tok == "" || len(tok) > token.MaxLen {
		return "", "", false
	}
	port := uint16(DefaultPort)
	if portText != "" {
		n, err := strconv.ParseUint(portText, 10, 16)
		if err != nil || n == 0 {
			return "", "", false
		}
		port = uint16(n)
	}
	if port == ShellPort || s.cfg.Envd != nil && port == s.cfg.Envd.Port {
		return "", "", false
	}
	if d.method == http.MethodGet {
		if _, q, _ := strings.Cut(d.uri, "?"); hasQueryAuth(q) {
			return "", "", false
		}
	}
	claims, err := s.cfg.Tokens.Authorize(tok, id, token.KindEndpoint, port)
	if err != nil {
		return "", "", false
	}
	tgt, err := s.cfg.Backend.Lookup(ctx, id)
	if err != nil || claims.Account != "" && tgt.Account != "" && claims.Account != tgt.Account ||
		!tgt.Ingress || !s.running.RunningNow(id) {
		return "", "", false
	}
	if tgt.Dial != nil {
		general.Store(&generalMemo{d.host, portText}) // copies: d is reused
		return "", "", false
	}
	addr = netip.AddrPortFrom(tgt.Addr, port).String()
	if plain, known := s.knownTLS(addr); !plain {
		if known {
			general.Store(&generalMemo{d.host, portText})
		}
		return "", "", false // unknown: the general path probes (speaksTLS) and remembers
	}
	return id, addr, true
}

// generalMemo is a connection's last host and X-aws-proxy-port text
// (the port a TLS guest serves on, as the route, decides) whose requests
// take the general path.
type generalMemo struct{ host, port string }

// directTaken, set by tests only, is called for each request the direct
// path takes.
var directTaken func()

// knownTLS reports what speaksTLS remembers, still, of the guest at
// addr: plain HTTP, or known (TLS if not plain); it never probes.
func (s *Server) knownTLS(addr string) (plain, known bool) {
	s.tlsMu.Lock()
	p, ok := s.tlsPorts[addr]
	s.tlsMu.Unlock()
	known = ok && time.Since(p.at) < tlsProbeTTL
	return known && !p.tls, known
}

// plainURI: uri (origin-form, visible ASCII) is what the general path
// sends on, url.ParseRequestURI then URL.RequestURI and cleanQuery, byte
// for byte: a path of unreserved characters, the sub-delimiters net/url
// leaves, and valid escapes; a query cleanQuery keeps. FuzzDirectHead
// holds that.
func plainURI(uri string) bool {
	path, query, _ := strings.Cut(uri, "?")
	for i := 0; i < len(path); i++ {
		switch c := path[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', isDigit(c), strings.IndexByte("-._~/$&+,:;=@", c) >= 0:
		case c == '%' && i+2 < len(path) && isHex(path[i+1]) && isHex(path[i+2]):
			i += 2
		default:
			return false
		}
	}
	return cleanQuery(query) == query
}

// writeHead writes the request to the guest: the client's head with
// exactly what outgoing and writeHead take out and put in on the general
// path (droppedRequestField, the token cookie, an empty User-Agent; kiln's
// X-Forwarded-*, a zero length where one is expected), then a small
// body's length and bytes, as http.Transport writes them. Several Cookie
// fields (h2's crumbs) become one, as stripAuthCookie makes them.
func (d *reqHead) writeHead(bw *bufio.Writer) error {
	bw.WriteString(d.method)
	bw.WriteByte(' ')
	bw.WriteString(d.uri)
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(d.host)
	bw.WriteString("\r\n")
	cookies, agent := false, false
	for _, f := range d.fields {
		switch {
		case droppedRequestField(f.k):
			continue
		case f.k == "Cookie":
			if !cookies {
				writeCookieField(bw, d.fields)
				cookies = true
			}
			continue
		case f.k == "User-Agent" && (f.v == "" || agent && d.cl > 0):
			// A body goes on the general path through http.Transport,
			// whose Request.write sends only the first User-Agent.
			agent = true
			continue
		case f.k == "User-Agent":
			agent = true
		}
		writeField(bw, f.k, strings.Trim(f.v, " \t")) // as writeHead; h2's values come untrimmed
	}
	if d.remoteIP != "" {
		writeField(bw, "X-Forwarded-For", d.remoteIP)
	}
	writeField(bw, "X-Forwarded-Host", d.host)
	if d.https {
		writeField(bw, "X-Forwarded-Proto", "https")
	} else {
		writeField(bw, "X-Forwarded-Proto", "http")
	}
	if d.cl > 0 {
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(d.cl), 10))
		bw.WriteString("\r\n")
	} else if zeroLengthMethod(d.method) {
		bw.WriteString("Content-Length: 0\r\n")
	}
	bw.WriteString("\r\n")
	_, err := bw.Write(d.body)
	return err
}

func writeField(bw *bufio.Writer, k, v string) {
	bw.WriteString(k)
	bw.WriteString(": ")
	bw.WriteString(v)
	bw.WriteString("\r\n")
}

// direct serves d (n bytes of the connection's buffer) on the direct
// path if directRoute lets it; handled false: it did nothing but the
// checks, and d goes the general way. keep: the connection can serve on.
func (c *h1Conn) direct(d *reqHead, n int) (keep, handled bool) {
	s := c.hs.direct
	d.body = nil
	if d.cl > 0 {
		// Only a body already read with its head: one that is still
		// coming streams on the general path. The slice stays valid
		// while the exchange runs: nothing reads c.br until the next
		// request (the watch reads the connection itself).
		buf, _ := c.br.Peek(c.br.Buffered())
		if len(buf) < n+d.cl {
			return false, false
		}
		d.body = buf[n : n+d.cl]
	}
	w := &h1Writer{c: c, response: response{cl: -1}}
	ctx := w.rc.context()
	id, addr, ok := s.directRoute(ctx, d, &c.toGeneral)
	if !ok {
		w.rc.cancel()
		return false, false
	}
	if directTaken != nil {
		directTaken()
	}
	c.br.Discard(n + d.cl)
	c.conn.SetReadDeadline(time.Time{})
	defer w.rc.cancel()
	d.remoteIP, d.https = c.remoteIP, c.state != nil
	c.watchMu.Lock()
	c.watchOn, c.watchCtx, c.watchBody = true, &w.rc, nil
	c.watchMu.Unlock()
	c.watchT.Reset(watchDelay)
	g := generalAnswer{d: d, proto: 1, remote: c.remote, state: c.state, h1: w}
	var code int
	var sent int64
	aborted := guard(c.hs.s.log, c.remote, func() { code, sent = c.forwardDirect(ctx, w, d, id, addr, &g) })
	c.unwatch()
	if aborted {
		return false, true
	}
	if g.cw != nil {
		countRequest(g.cw.code, g.cw.n, ctx.Err())
		w.finish()
		return !w.closeAfter && w.err == nil, true
	}
	countRequest(code, sent, ctx.Err())
	w.fail(c.bw.Flush())
	return !w.closeAfter && w.err == nil, true
}

// forwardDirect sends d and writes the guest's common answer to the
// client (sendDirect has the rest). It returns the status and body bytes
// for the metrics; it panics http.ErrAbortHandler as forwardH1 does.
func (c *h1Conn) forwardDirect(ctx context.Context, w *h1Writer, d *reqHead, id, addr string, g *generalAnswer) (code int, sent int64) {
	s := c.hs.direct
	s.cfg.Backend.ConnOpened(id)
	defer s.cfg.Backend.ConnClosed(id)
	pc, rh, ok := s.sendDirect(ctx, d, id, addr, c.rfields[:0], g)
	if !ok {
		return 0, 0
	}
	c.rfields = rh.fields[:0]
	reuse := false
	defer func() { s.up.release(addr, pc, reuse) }()
	w.closeAfter = c.hs.closing.Load()
	w.writeStatus(rh.code)
	c.writeAnswerFields(&rh, w.closeAfter)
	sent, rerr, werr := copyLength(c.bw, pc.br, rh.cl)
	switch {
	case werr != nil:
		w.fail(werr)
	case rerr != nil:
		if ctx.Err() == nil {
			// The guest broke off mid-body: as forwardH1, abort the
			// client's response so it does not take a truncated body for
			// a whole one.
			panic(http.ErrAbortHandler)
		}
	default:
		reuse = ctx.Err() == nil
	}
	return rh.code, sent
}

// sendDirect is serve's and forwardH1's part after directRoute took d,
// for both loops, up to the answer's head: the VM woken (RunningNow said
// it runs: wake returns at once but for a suspend begun since), d sent
// to the guest at addr, and its answer's head read into rh (fields in
// fs). ok: the answer is the common one (directAnswer), for the caller
// to write, and then to release pc. Otherwise the general path's writer
// (g) has answered: a refusal, a guest that failed, an answer the direct
// path does not write itself, or any answer after a wake (the writer
// exists then, and one answer must come from one writer).
func (s *Server) sendDirect(ctx context.Context, d *reqHead, id, addr string, fs []hfield, g *generalAnswer) (pc *upConn, rh respHead, ok bool) {
	if !s.running.RunningNow(id) {
		cw, _ := g.writer()
		if !s.wake(ctx, cw, id, false) {
			return nil, rh, false
		}
	}
	pc, err := s.up.send(ctx, addr, d.method, d.cl > 0, d)
	if err != nil {
		cw, r := g.writer()
		s.guestFailed(cw, r, id, err)
		return nil, rh, false
	}
	buf, _ := pc.br.Peek(pc.br.Buffered())
	rh, hn, ok := parseRespHead(buf, d.method, fs)
	if g.cw != nil || !ok || !directAnswer(&rh) {
		// 1xx, 204/304, HEAD's, chunked, unsniffed, an event stream, ...:
		// the general path's reader and writer.
		cw, r := g.writer()
		s.answerHead(ctx, cw, r, d, id, addr, pc)
		return nil, rh, false
	}
	pc.br.Discard(hn)
	pc.headRead()
	return pc, rh, true
}

// generalAnswer is a direct request's answer on the general path's
// writer, made only when the direct path does not write the answer
// itself (its header map and request were a tenth of a request's
// allocations), and then wrapped for the metrics as ServeHTTP wraps it.
type generalAnswer struct {
	d      *reqHead
	proto  int // 1 or 2
	remote string
	state  *tls.ConnectionState
	h1     *h1Writer // HTTP/1.1: the request's writer, given a header map
	st     *h2Stream // h2: the stream to make a writer for
	h2     *h2Writer // made for st
	cw     *countingWriter
	r      *http.Request
}

func (g *generalAnswer) writer() (*countingWriter, *http.Request) {
	if g.cw != nil {
		return g.cw, g.r
	}
	d := g.d
	g.r = &http.Request{Method: d.method, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Host: d.host,
		Header: http.Header{}, Body: http.NoBody, RemoteAddr: g.remote, TLS: g.state}
	var w http.ResponseWriter
	if g.proto == 2 {
		g.r.Proto, g.r.ProtoMajor, g.r.ProtoMinor = "HTTP/2.0", 2, 0
		g.h2 = &h2Writer{st: g.st, response: response{req: g.r, h: make(http.Header, 8), cl: -1}}
		w = g.h2
	} else {
		g.h1.h, g.h1.req = make(http.Header, 8), g.r
		w = g.h1
	}
	g.cw = &countingWriter{ResponseWriter: w}
	return g.cw, g.r
}

// directAnswer: the answer can go to the client as the guest wrote it
// (less droppedAnswerField): it has one Content-Type that is no event
// stream (those are flushed write by write), or no body to sniff a type
// from (sniffType).
func directAnswer(rh *respHead) bool {
	ct, n := "", 0
	for _, f := range rh.fields {
		if f.k == "Content-Type" {
			ct, n = f.v, n+1
		}
	}
	if n == 0 {
		return rh.cl == 0
	}
	media, _, _ := strings.Cut(ct, ";")
	return n == 1 && !strings.EqualFold(strings.TrimSpace(media), "text/event-stream")
}

// writeAnswerFields writes the answer's fields as h1Writer.sendHeader
// writes the general path's (the guest's, less droppedAnswerField; a
// Date if it has none; "Connection: close" when the connection ends) and
// the empty line.
func (c *h1Conn) writeAnswerFields(rh *respHead, closeAfter bool) {
	bw := c.bw
	date := false
	for _, f := range rh.fields {
		if droppedAnswerField(f.k, f.v) {
			continue
		}
		date = date || f.k == "Date"
		writeField(bw, f.k, f.v)
	}
	if !date {
		writeField(bw, "Date", httpDate())
	}
	if closeAfter {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
}

// copyLength copies a body of n bytes from br to bw, in bw's own buffer
// (no copy buffer of its own): rerr when the guest ends it early, werr
// when the client's connection fails.
func copyLength(bw *bufio.Writer, br *bufio.Reader, n int64) (written int64, rerr, werr error) {
	for n > 0 {
		if bw.Available() == 0 {
			if werr = bw.Flush(); werr != nil {
				return written, nil, werr
			}
		}
		p := bw.AvailableBuffer()
		p = p[:min(int64(cap(p)), n)]
		k, err := br.Read(p)
		if k > 0 {
			bw.Write(p[:k]) // into its own free space: no copy
			n -= int64(k)
			written += int64(k)
		}
		if err != nil && n > 0 {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return written, err, nil
		}
	}
	return written, nil, nil
}
