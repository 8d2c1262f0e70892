package proxy

import (
	"bytes"
	"net/http"
	"net/url"
	"strings"
)

// parseRequestHead parses the common request at the start of buf, a
// client's on the h1 loop, as parseResponseHead parses the guest's
// answer: "METHOD /origin-form HTTP/1.1", plain field lines, one Host,
// no body and nothing that changes framing, connection or protocol
// (Content-Length, Transfer-Encoding, Trailer, Connection, Upgrade,
// Expect, Pragma). ok false: http.ReadRequest parses it, from the same
// bytes. FuzzRequestHead holds that whatever this parser takes,
// http.ReadRequest parses alike. The loop's own checks (checkRequest)
// run on both.
func parseRequestHead(buf []byte) (r *http.Request, n int, ok bool) {
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	if end < 0 {
		return nil, 0, false
	}
	n = end + 4
	head := string(buf[:end+2])
	line, rest, found := cutCRLF(head)
	if !found {
		return nil, 0, false
	}
	sp := strings.IndexByte(line, ' ')
	uri, ok := strings.CutSuffix(line[sp+1:], " HTTP/1.1")
	if sp <= 0 || !ok || uri == "" || uri[0] != '/' {
		return nil, 0, false
	}
	method := line[:sp]
	for i := 0; i < len(method); i++ {
		if !isTokenByte(method[i]) {
			return nil, 0, false
		}
	}
	for i := 0; i < len(uri); i++ {
		if c := uri[i]; c <= ' ' || c >= 0x7f {
			return nil, 0, false
		}
	}
	if method == http.MethodConnect {
		return nil, 0, false
	}
	h, ok := parseFieldLines(rest)
	if !ok || len(h["Host"]) != 1 {
		return nil, 0, false
	}
	for _, k := range [...]string{"Content-Length", "Transfer-Encoding", "Trailer", "Connection", "Upgrade", "Expect", "Pragma"} {
		if _, ok := h[k]; ok {
			return nil, 0, false
		}
	}
	u, err := url.ParseRequestURI(uri)
	if err != nil {
		return nil, 0, false
	}
	host := h["Host"][0]
	delete(h, "Host")
	r = &http.Request{Method: method, URL: u, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: h,
		Host: host, RequestURI: uri, Body: http.NoBody}
	return r, n, true
}
