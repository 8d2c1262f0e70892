package proxy

import (
	"context"
	"net"
	"net/http"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The direct path on the h2 loop: a plain bodyless stream's header block
// becomes a reqHead (no http.Request, no header map, no copy of it for
// the guest); directRoute decides as on HTTP/1.1. The answer goes
// through the stream's h2Writer and the general path's answerH1, so HTTP/2
// framing, flow control, sniffing and the answer's header rules are the
// ones every stream gets.

// h2DirectHead is a header block as a reqHead, or nil for anything but
// the plain request newRequest would take: the four pseudo-headers once
// each and first, an origin-form :path that plainURI keeps, an
// :authority and no Host field, valid lower-case fields with no
// connection-specific one, no te, content-length, trailer or expect.
func h2DirectHead(fields []hpack.HeaderField, https bool) *reqHead {
	var pseudo [4]string
	var seen [4]bool
	regular := false
	fs := make([]hfield, 0, len(fields))
	for _, hf := range fields {
		if strings.HasPrefix(hf.Name, ":") {
			i := -1
			switch hf.Name {
			case ":method":
				i = 0
			case ":scheme":
				i = 1
			case ":authority":
				i = 2
			case ":path":
				i = 3
			}
			if regular || i < 0 || seen[i] {
				return nil
			}
			seen[i], pseudo[i] = true, hf.Value
			continue
		}
		regular = true
		if !validH2FieldName(hf.Name) || !httpguts.ValidHeaderFieldValue(hf.Value) || h2Forbidden[hf.Name] {
			return nil
		}
		switch {
		case hf.Name == "te", hf.Name == "host", hf.Name == "content-length", hf.Name == "trailer", hf.Name == "expect",
			hf.Name == "content-type" && strings.HasPrefix(hf.Value, "application/grpc"): // h2c to the guest
			return nil
		}
		fs = append(fs, hfield{canonicalH2Key(hf.Name), hf.Value})
	}
	method, authority, path := pseudo[0], pseudo[2], pseudo[3]
	if !seen[0] || !seen[1] || !seen[2] || !seen[3] || pseudo[1] == "" || !validMethod(method) || method == "" ||
		method == http.MethodConnect || authority == "" || !validHost(authority) || path == "" || path[0] != '/' {
		return nil
	}
	for i := 0; i < len(path); i++ {
		if c := path[i]; c <= ' ' || c >= 0x7f {
			return nil
		}
	}
	if !plainURI(path) {
		return nil
	}
	return &reqHead{method: method, uri: path, host: authority, fields: fs, https: https}
}

// direct serves st on the direct path if directRoute lets it; false: it
// did nothing but the checks.
func (c *h2Conn) direct(st *h2Stream) bool {
	s, d := c.hs.direct, st.head
	id, addr, ok := s.directRoute(st.ctx, d, &c.generalHost)
	if !ok {
		return false
	}
	if directTaken != nil {
		directTaken()
	}
	if ip, _, err := net.SplitHostPort(c.remote); err == nil {
		d.remoteIP = ip
	}
	r := &http.Request{Method: d.method, Proto: "HTTP/2.0", ProtoMajor: 2, Host: d.host, Body: http.NoBody,
		RemoteAddr: c.remote, TLS: c.state}
	w := &h2Writer{st: st, response: response{req: r, h: make(http.Header, 8), cl: -1}}
	cw := &countingWriter{ResponseWriter: w}
	if guard(s.log, c.remote, func() { s.forwardHead(st.ctx, cw, r, d, id, addr) }) {
		c.endStream(st, http2.ErrCodeInternal)
		return true
	}
	countRequest(cw.code, cw.n, st.ctx.Err())
	w.finish()
	code := http2.ErrCodeNo
	if w.err != nil {
		code = http2.ErrCodeInternal // the answer broke off: not a whole one
	}
	c.endStream(st, code)
	return true
}

// forwardHead is serve's and forwardH1's part after directRoute took d:
// the connection counted open, the VM woken (RunningNow said it runs;
// wake returns at once but for a suspend begun since), d sent to the
// guest at addr and its answer passed on by answerH1, through w (r is
// the request w answers).
func (s *Server) forwardHead(ctx context.Context, w http.ResponseWriter, r *http.Request, d *reqHead, id, addr string) {
	s.cfg.Backend.ConnOpened(id)
	defer s.cfg.Backend.ConnClosed(id)
	if !s.wake(ctx, w, id, false) {
		return
	}
	pc, err := s.up.send(ctx, addr, d.method, d)
	if err != nil {
		s.guestFailed(w, r, id, err)
		return
	}
	s.answerHead(ctx, w, r, d, id, addr, pc)
}

// answerHead reads the guest's answer to d on pc and passes it on as the
// general path does.
func (s *Server) answerHead(ctx context.Context, w http.ResponseWriter, r *http.Request, d *reqHead, id, addr string, pc *upConn) {
	out := &http.Request{Method: d.method, Host: d.host}
	resp, err := pc.readResponse(out)
	if err != nil {
		s.guestFailed(w, r, id, pc.fail(ctx, err))
		return
	}
	s.answerH1(ctx, w, r, id, out, resp, pc, addr)
}
