package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
)

// The guest's common answer (HTTP/1.1, a status of 200 to 599 but 204
// and 304, a Content-Length, nothing that changes the framing) is parsed
// here from the bytes already buffered, with one string for the whole
// header and its values as slices of it: http.ReadResponse, with
// textproto's line reads, a string per value and its body wrapper, was
// the largest parser in the proxy's CPU and allocation profiles.
// Anything else, or anything this parser is unsure of, goes to
// http.ReadResponse, which reads the same bytes again: an answer is
// either parsed exactly as net/http parses it (FuzzResponseHead holds
// that) or by net/http.

// respHead is the guest's common answer as the own parser reads it.
type respHead struct {
	code   int
	status string // "200 OK", as the guest wrote it
	fields []hfield
	cl     int64
}

// parseRespHead parses the header at the start of buf, appending its
// fields to fs; ok false: let http.ReadResponse parse it. n is the
// header's length in buf.
func parseRespHead(buf []byte, method string, fs []hfield) (rh respHead, n int, ok bool) {
	if method == http.MethodHead {
		return rh, 0, false // a length without a body
	}
	line, rest, n, found := splitHead(buf)
	if !found || len(line) < 12 || line[:9] != "HTTP/1.1 " || line[9] < '2' || line[9] > '5' ||
		!isDigit(line[10]) || !isDigit(line[11]) || len(line) > 12 && line[12] != ' ' {
		return rh, 0, false
	}
	code := int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if code == http.StatusNoContent || code == http.StatusNotModified {
		return rh, 0, false
	}
	if strings.ContainsAny(line, "\r\n") {
		return rh, 0, false
	}
	if fs, ok = parseFields(rest, fs); !ok {
		return rh, 0, false
	}
	cl, ncl := int64(-1), 0
	for _, f := range fs {
		switch f.k {
		case "Transfer-Encoding", "Trailer", "Connection", "Pragma":
			// Framing, trailers, Close, and net/http's Cache-Control from
			// Pragma: net/http's rules.
			return rh, 0, false
		case "Content-Length":
			// net/http merges equal repeated ones: not for this parser.
			ncl++
			u, err := strconv.ParseUint(f.v, 10, 63)
			if err != nil {
				return rh, 0, false
			}
			cl = int64(u)
		}
	}
	if ncl != 1 {
		return rh, 0, false // chunked or to the end: net/http's readers
	}
	return respHead{code: code, status: line[9:], fields: fs, cl: cl}, n, true
}

// parseResponseHead is parseRespHead made an http.Response.
func parseResponseHead(buf []byte, method string) (resp *http.Response, n int, ok bool) {
	var fs [32]hfield
	rh, n, ok := parseRespHead(buf, method, fs[:0])
	if !ok {
		return nil, 0, false
	}
	resp = &http.Response{Status: rh.status, StatusCode: rh.code, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: headerOf(rh.fields), ContentLength: rh.cl, Body: http.NoBody}
	return resp, n, true
}

// parseFields parses header field lines (each ending in CRLF), appending
// them to fs with canonical names; ok false for anything net/http might
// read otherwise: a line that is not a token, a colon and a value of
// visible characters, spaces, tabs and obs-text (obs-fold included).
func parseFields(rest string, fs []hfield) ([]hfield, bool) {
	for len(rest) > 0 {
		var field string
		var found bool
		if field, rest, found = cutCRLF(rest); !found {
			return fs, false
		}
		colon := -1
		for i := 0; i < len(field); i++ {
			if field[i] == ':' {
				colon = i
				break
			}
			if !isTokenByte(field[i]) {
				return fs, false
			}
		}
		if colon <= 0 {
			return fs, false
		}
		v := field[colon+1:]
		for i := 0; i < len(v); i++ {
			if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
				return fs, false
			}
		}
		fs = append(fs, hfield{commonKey(field[:colon]), textproto.TrimString(v)})
	}
	return fs, true
}

// headerOf is fs as net/http's header map. Values share one array, each
// capped at its length: an append to one (a handler adding to a copied
// header) copies instead of overwriting the next.
func headerOf(fs []hfield) http.Header {
	vals := make([]string, len(fs))
	h := make(http.Header, len(fs))
	for i, f := range fs {
		vals[i] = f.v
		vv := vals[i : i+1 : i+1]
		if old, dup := h[f.k]; dup {
			vv = append(old, f.v)
		}
		h[f.k] = vv
	}
	return h
}

// cutCRLF splits s at its first CRLF; not found also when a bare LF
// comes first (net/http ends a line there: not for this parser).
func cutCRLF(s string) (line, rest string, found bool) {
	for i := 0; i+1 < len(s); i++ {
		if s[i] == '\r' && s[i+1] == '\n' {
			return s[:i], s[i+2:], true
		}
		if s[i] == '\n' {
			break
		}
	}
	return "", "", false
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// isTokenByte: RFC 9110 tchar.
func isTokenByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || isDigit(c) || c < 0x7f && c > ' ' &&
		bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}

// commonKey is the canonical form of a field name (a token), without an
// allocation for the common names in either spelling.
func commonKey(k string) string {
	if c, ok := fieldKeys[k]; ok {
		return c
	}
	return textproto.CanonicalMIMEHeaderKey(k) // k itself if canonical
}

var fieldKeys = func() map[string]string {
	m := make(map[string]string, 2*len(h2Canonical))
	for low, c := range h2Canonical {
		m[low], m[c] = c, c
	}
	return m
}()

// lengthBody is a body of a declared length: the guest ending it early
// is an error, as net/http's body reports it, never a whole body.
type lengthBody struct {
	r *bufio.Reader
	n int64
}

func (b *lengthBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	if err == io.EOF {
		if b.n > 0 {
			return n, io.ErrUnexpectedEOF
		}
	}
	if b.n == 0 && err == nil {
		err = io.EOF
	}
	return n, err
}

func (b *lengthBody) Close() error { return nil }
