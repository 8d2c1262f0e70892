package proxy

import (
	"bytes"
	"net/http"
	"net/url"
	"strings"
)

// hfield is one parsed header field: its canonical name and its trimmed
// value, both slices of the head's one string (no allocation each).
type hfield struct{ k, v string }

// reqHead is the common request as the h1 loop parses it, before it is
// an http.Request (if it ever becomes one: the direct path, direct.go,
// forwards it as it is). Host is not among fields.
type reqHead struct {
	method, uri, host string
	fields            []hfield
	// hasCL: one plain Content-Length field (directBodyLen) was taken
	// out of fields; cl is its value. body is the direct path's: the cl
	// bytes after the head in the loop's read buffer.
	hasCL bool
	cl    int
	body  []byte
	// Set by the direct path for writeHead.
	remoteIP string
	https    bool
}

// splitHead finds the header at the start of buf (up to its empty line),
// makes it one string and cuts its first line off; n is the header's
// length in buf. Both own parsers (requests, answers) open this way.
func splitHead(buf []byte) (line, rest string, n int, ok bool) {
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	if end < 0 {
		return "", "", 0, false
	}
	line, rest, ok = cutCRLF(string(buf[:end+2]))
	return line, rest, end + 4, ok
}

// parseReqHead parses the common request at the start of buf, a
// client's on the h1 loop, as parseResponseHead parses the guest's
// answer: "METHOD /origin-form HTTP/1.1", plain field lines, one Host,
// nothing that changes framing, connection or protocol (Transfer-Encoding,
// Trailer, Connection, Upgrade, Expect, Pragma) and no Content-Length but
// one plain one (directBodyLen), which only the direct path takes (hasCL:
// the loop reads any other with http.ReadRequest). Fields are appended
// to fs. ok false: http.ReadRequest parses it, from the same bytes. FuzzRequestHead holds that whatever
// this parser takes, http.ReadRequest parses alike. The loop's own
// checks (checkRequest) run on both.
func parseReqHead(buf []byte, fs []hfield) (d reqHead, n int, ok bool) {
	line, rest, n, ok := splitHead(buf)
	if !ok {
		return d, 0, false
	}
	sp := strings.IndexByte(line, ' ')
	uri, ok := strings.CutSuffix(line[sp+1:], " HTTP/1.1")
	if sp <= 0 || !ok || uri == "" || uri[0] != '/' {
		return d, 0, false
	}
	method := line[:sp]
	for i := 0; i < len(method); i++ {
		if !isTokenByte(method[i]) {
			return d, 0, false
		}
	}
	for i := 0; i < len(uri); i++ {
		if c := uri[i]; c <= ' ' || c >= 0x7f {
			return d, 0, false
		}
	}
	if method == http.MethodConnect {
		return d, 0, false
	}
	if fs, ok = parseFields(rest, fs); !ok {
		return d, 0, false
	}
	d = reqHead{method: method, uri: uri, fields: fs[:0]}
	hosts := 0
	for _, f := range fs {
		switch f.k {
		case "Host":
			d.host = f.v
			hosts++
			continue
		case "Content-Length":
			cl, ok := directBodyLen(f.v)
			if !ok || d.hasCL {
				return d, 0, false
			}
			d.hasCL, d.cl = true, cl
			continue
		case "Transfer-Encoding", "Trailer", "Connection", "Upgrade", "Expect", "Pragma":
			return d, 0, false
		}
		d.fields = append(d.fields, f) // in place: never ahead of the reading
	}
	if hosts != 1 {
		return d, 0, false
	}
	return d, n, true
}

// maxDirectBody bounds the body the direct path sends from the loop's
// 4 KiB read buffer, leaving the head as much: small JSON calls to a
// sandbox's API. What comes in one read decides in the end (a Go
// client's first TLS records hold ~1.2 KiB; OpenSSL's up to 16 KiB);
// anything longer or later streams on the general path.
const maxDirectBody = 2 << 10

// directBodyLen parses a Content-Length value the direct path takes: a
// plain decimal without sign, space or leading zero, at most
// maxDirectBody. Anything else (that net/http may still read, "05", or
// refuse, "+5") goes to http.ReadRequest and the general path.
func directBodyLen(v string) (int, bool) {
	if v == "" || len(v) > 1 && v[0] == '0' || len(v) > 5 {
		return 0, false
	}
	n := 0
	for i := 0; i < len(v); i++ {
		if !isDigit(v[i]) {
			return 0, false
		}
		n = n*10 + int(v[i]-'0')
	}
	return n, n <= maxDirectBody
}

// request is d as the http.Request http.ReadRequest would make of it;
// false for one with a Content-Length, which http.ReadRequest reads.
func (d *reqHead) request() (*http.Request, bool) {
	if d.hasCL {
		return nil, false
	}
	u, err := url.ParseRequestURI(d.uri)
	if err != nil {
		return nil, false
	}
	return &http.Request{Method: d.method, URL: u, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: headerOf(d.fields), Host: d.host, RequestURI: d.uri, Body: http.NoBody}, true
}

// parseRequestHead is parseReqHead made an http.Request.
func parseRequestHead(buf []byte) (r *http.Request, n int, ok bool) {
	var fs [32]hfield
	d, n, ok := parseReqHead(buf, fs[:0])
	if !ok {
		return nil, 0, false
	}
	if r, ok = d.request(); !ok {
		return nil, 0, false
	}
	return r, n, true
}
