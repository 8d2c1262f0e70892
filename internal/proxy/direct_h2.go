package proxy

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The direct path on the h2 loop: a plain stream's header block (no
// body, or a small one that has come whole: h2Body.whole) becomes a
// reqHead (no http.Request, no header map, no copy of it for the
// guest); directRoute decides as on HTTP/1.1. The guest's common
// answer (parseRespHead, directAnswer) is encoded into the stream's
// HEADERS frame from its parsed fields and its body sent as DATA through
// the stream's windows, as h2Writer sends what answerH1 gives it; any
// other answer goes through an h2Writer and the general answerH1.

// h2DirectHead is a header block as a reqHead, or nil for anything but
// the plain request newRequest would take: the four pseudo-headers once
// each and first, an origin-form :path that plainURI keeps, an
// :authority and no Host field, valid lower-case fields with no
// connection-specific one, no te, trailer or expect. A block that ends
// the stream (end) has no content-length but one of 0; one that a body
// follows has one plain content-length (directBodyLen) of 1 to
// maxDirectBody (hasCL, cl), which the direct path takes only once the
// body has come whole (h2Body.whole).
func h2DirectHead(fields []hpack.HeaderField, https, end bool) *reqHead {
	d := new(reqHead)
	if !d.fromH2(fields, https, end, make([]hfield, 0, len(fields))) {
		return nil
	}
	return d
}

// fromH2 makes d h2DirectHead's reqHead of fields, appending its fields
// to fs; false: nil from h2DirectHead.
func (d *reqHead) fromH2(fields []hpack.HeaderField, https, end bool, fs []hfield) bool {
	var pseudo [4]string
	var seen [4]bool
	regular, zeroLength := false, false
	cl, hasCL := 0, false
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
				return false
			}
			seen[i], pseudo[i] = true, hf.Value
			continue
		}
		regular = true
		if !validH2FieldName(hf.Name) || !httpguts.ValidHeaderFieldValue(hf.Value) || h2Forbidden[hf.Name] {
			return false
		}
		switch {
		case hf.Name == "content-length" && end && hf.Value == "0" && !zeroLength:
			// Go's client says it of a bodyless POST; the stream ended with
			// the headers, and the guest is told as the general path tells
			// it (writeHead: "Content-Length: 0" for the methods that
			// expect one).
			zeroLength = true
			continue
		case hf.Name == "content-length" && !end && !hasCL:
			// A body follows: as Transport, the guest is told its length
			// (writeHead), which put holds the DATA to.
			n, ok := directBodyLen(hf.Value)
			if !ok || n == 0 {
				return false
			}
			cl, hasCL = n, true
			continue
		case hf.Name == "te", hf.Name == "host", hf.Name == "content-length", hf.Name == "trailer", hf.Name == "expect",
			hf.Name == "content-type" && strings.HasPrefix(hf.Value, "application/grpc"): // h2c to the guest
			return false
		}
		fs = append(fs, hfield{canonicalH2Key(hf.Name), hf.Value})
	}
	method, authority, path := pseudo[0], pseudo[2], pseudo[3]
	if !seen[0] || !seen[1] || !seen[2] || !seen[3] || pseudo[1] == "" || !validMethod(method) || method == "" ||
		method == http.MethodConnect || authority == "" || !validHost(authority) || path == "" || path[0] != '/' {
		return false
	}
	for i := 0; i < len(path); i++ {
		if c := path[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	if !plainURI(path) || !end && !hasCL {
		return false
	}
	*d = reqHead{method: method, uri: path, host: authority, fields: fs, https: https, hasCL: hasCL, cl: cl}
	return true
}

// direct serves st on the direct path if directRoute lets it; false: it
// did nothing but the checks.
func (c *h2Conn) direct(st *h2Stream) bool {
	s, d := c.hs.direct, st.head
	if d.hasCL && !st.body.whole(d.cl) {
		return false // still coming, or not as declared: it streams on the general path
	}
	id, addr, ok := s.directRoute(st.ctx, d, &c.toGeneral)
	if !ok {
		return false
	}
	if d.hasCL {
		if d.body, ok = st.body.take(d.cl); !ok {
			return false
		}
	}
	if directTaken != nil {
		directTaken()
	}
	d.remoteIP = c.remoteIP
	g := generalAnswer{d: d, proto: 2, remote: c.remote, state: c.state, st: st}
	var code int
	var sent int64
	var err error
	if guard(s.log, c.remote, func() { code, sent, err = c.forwardDirect(st, d, id, addr, &g) }) {
		c.endStream(st, http2.ErrCodeInternal)
		return true
	}
	if g.cw != nil {
		countRequest(g.cw.code, g.cw.n, st.ctx.Err())
		g.h2.finish()
		err = g.h2.err
	} else {
		countRequest(code, sent, st.ctx.Err())
	}
	ec := http2.ErrCodeNo
	if err != nil {
		ec = http2.ErrCodeInternal // the answer broke off: not a whole one
	}
	c.endStream(st, ec)
	return true
}

// forwardDirect sends d and writes the guest's common answer on st
// (sendDirect has the rest): the status and body bytes for the metrics,
// and err if the answer broke off. It panics http.ErrAbortHandler as
// forwardH1 does.
func (c *h2Conn) forwardDirect(st *h2Stream, d *reqHead, id, addr string, g *generalAnswer) (code int, sent int64, err error) {
	s := c.hs.direct
	s.cfg.Backend.ConnOpened(id)
	defer s.cfg.Backend.ConnClosed(id)
	var fs [16]hfield
	pc, rh, ok := s.sendDirect(st.ctx, d, id, addr, fs[:0], g)
	if !ok {
		return 0, 0, nil
	}
	reuse := false
	defer func() { s.up.release(addr, pc, reuse) }()
	sent, err, reuse = c.writeAnswer(st, &rh, pc.br)
	return rh.code, sent, err
}

// writeAnswer writes the guest's common answer rh, its body read from
// br, on st as h2Writer writes what answerH1 gives it: the guest's fields
// less droppedAnswerField, a Date if it has none; a body of up to pendMax
// in the HEADERS' flush (window permitting), more in DATA frames as the
// windows allow. ok: the body was read to its end and the stream ended.
func (c *h2Conn) writeAnswer(st *h2Stream, rh *respHead, br *bufio.Reader) (sent int64, err error, ok bool) {
	pend := pendBuffers.Get().(*[pendMax]byte)
	defer pendBuffers.Put(pend)
	left := rh.cl
	body, err := readChunk(pend, br, &left)
	if err != nil {
		// Nothing sent yet: as the general path's abort, the stream is
		// reset without an answer.
		c.guestBrokeOff(st)
		return 0, nil, false
	}
	end := left == 0
	sentData := false
	if len(body) > 0 {
		if n, terr := st.takeNow(len(body)); terr == nil && n == len(body) {
			err, sentData = st.write(func() error {
				if err := c.writeAnswerHead(st.id, rh, false); err != nil {
					return err
				}
				return c.fr.WriteData(st.id, end, body)
			}), true
		}
	}
	if !sentData {
		err = st.write(func() error { return c.writeAnswerHead(st.id, rh, len(body) == 0 && end) })
		if err == nil && len(body) > 0 {
			err = st.writeData(body, end)
		}
	}
	for sent = int64(len(body)); err == nil && !end; sent += int64(len(body)) {
		if body, err = readSome(pend, br, &left); err != nil {
			c.guestBrokeOff(st)
			return sent, nil, false
		}
		end = left == 0
		err = st.writeData(body, end)
	}
	if err != nil {
		st.rc.cancel()
		return sent, err, false
	}
	return sent, nil, st.ctx.Err() == nil
}

// readChunk reads the next up to pendMax bytes of a body of which *left
// are still to come.
func readChunk(pend *[pendMax]byte, br *bufio.Reader, left *int64) ([]byte, error) {
	p := pend[:min(*left, pendMax)]
	n, err := io.ReadFull(br, p)
	*left -= int64(n)
	return p[:n], err
}

// readSome reads what has come of the rest of a body, at least a byte
// and up to pendMax, as the general writer sends each read once the head
// is out: a slow body (progress output) is not held back for a full chunk.
func readSome(pend *[pendMax]byte, br *bufio.Reader, left *int64) ([]byte, error) {
	n, err := br.Read(pend[:min(*left, pendMax)])
	*left -= int64(n)
	if n > 0 {
		err = nil
	} else if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return pend[:n], err
}

// guestBrokeOff: the guest ended a body early. As answerH1's, the
// client's stream is aborted, so it does not take a truncated body for a
// whole one, unless the stream has ended anyway.
func (c *h2Conn) guestBrokeOff(st *h2Stream) {
	if st.ctx.Err() == nil {
		panic(http.ErrAbortHandler)
	}
}

// statusCodes are the codes parseRespHead takes as text. (rh.status[:3]
// would do, but the encoder keeps what it is given, and escape analysis
// then sends rh's fields, all of them, to the heap.)
var statusCodes = func() (t [400]string) {
	for i := range t {
		t[i] = strconv.Itoa(200 + i)
	}
	return t
}()

// writeAnswerHead encodes and writes rh's header block, under the write
// lock, as writeHeaders does for the general writer's header map.
func (c *h2Conn) writeAnswerHead(id uint32, rh *respHead, end bool) error {
	c.hbuf.Reset()
	c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusCodes[rh.code-200]})
	date := false
	for _, f := range rh.fields {
		if droppedAnswerField(f.k, f.v) {
			continue
		}
		date = date || f.k == "Date"
		c.henc.WriteField(hpack.HeaderField{Name: lowerH2Key(f.k), Value: sanitizeFieldValue(f.v),
			Sensitive: f.k == "Set-Cookie" || f.k == "Authorization"})
	}
	if !date {
		c.henc.WriteField(hpack.HeaderField{Name: "date", Value: httpDate()})
	}
	return c.writeBlock(id, c.hbuf.Bytes(), end)
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
