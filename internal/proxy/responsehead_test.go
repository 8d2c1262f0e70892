package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// responseHeadSeeds are answers for TestResponseHead and
// FuzzResponseHead: the common ones, and what parseResponseHead leaves
// to net/http.
var responseHeadSeeds = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nDate: Mon, 30 Nov 2026 13:00:00 GMT\r\n\r\nhello",
	"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nX-Custom-thing:  a b \t\r\nx-custom-thing: c\r\n\r\n",
	"HTTP/1.1 200\r\nContent-Length: 3\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nabc",
	"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\nX-Obs: caf\xe9\r\n\r\nno",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
	"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
	"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\n\r\nto the end",
	"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Folded: a\r\n b\r\n\r\nx",
	"HTTP/1.1 200 OK\r\n Content-Length: 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length: 1\nX: y\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX: a\rb\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nPragma: no-cache\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nX\x00: y\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
}

// TestResponseHead: the common answers take the own parser; the others
// (framing, Close, 1xx, obs-fold, bad fields) are left to net/http.
func TestResponseHead(t *testing.T) {
	own := map[int]bool{0: true, 1: true, 2: true, 3: true, 22: true}
	for i, s := range responseHeadSeeds {
		resp, _, ok := parseResponseHead([]byte(s), http.MethodGet)
		if ok != own[i] {
			t.Errorf("seed %d %q: own parser %v, want %v", i, s, ok, own[i])
			continue
		}
		if ok {
			checkResponseHead(t, []byte(s), http.MethodGet)
			if resp.Header.Get("Content-Length") == "" {
				t.Errorf("seed %d: Content-Length dropped", i)
			}
		}
		if _, _, ok := parseResponseHead([]byte(s), http.MethodHead); ok {
			t.Errorf("seed %d: an answer to HEAD took the own parser", i)
		}
	}
}

// TestResponseHeadShortBody: a guest that ends a body early gives an
// error, never a whole body.
func TestResponseHeadShortBody(t *testing.T) {
	br := bufio.NewReader(strings.NewReader(responseHeadSeeds[22]))
	br.Peek(1)
	buf, _ := br.Peek(br.Buffered())
	_, n, ok := parseResponseHead(buf, http.MethodGet)
	if !ok {
		t.Fatal("not parsed")
	}
	br.Discard(n)
	b, err := io.ReadAll(&lengthBody{r: br, n: 10})
	if string(b) != "short" || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short body: %q %v, want \"short\" and io.ErrUnexpectedEOF", b, err)
	}
}

// checkResponseHead holds parseResponseHead to net/http: whatever it
// parses, http.ReadResponse parses alike (status, header, framing) and
// finds the body where it does.
func checkResponseHead(t *testing.T, data []byte, method string) {
	t.Helper()
	resp, n, ok := parseResponseHead(data, method)
	if !ok {
		return
	}
	br := bufio.NewReader(bytes.NewReader(data))
	want, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("own parser took %q, net/http refused it: %v", data, err)
	}
	if resp.StatusCode != want.StatusCode || resp.Status != want.Status || resp.Proto != want.Proto ||
		resp.ProtoMajor != want.ProtoMajor || resp.ProtoMinor != want.ProtoMinor ||
		resp.ContentLength != want.ContentLength || resp.Close != want.Close ||
		len(want.TransferEncoding) != 0 || want.Trailer != nil || !reflect.DeepEqual(resp.Header, want.Header) {
		t.Fatalf("%q:\nown     %d %q %s %v cl=%d close=%v\nnet/http %d %q %s %v cl=%d close=%v te=%v trailer=%v",
			data, resp.StatusCode, resp.Status, resp.Proto, resp.Header, resp.ContentLength, resp.Close,
			want.StatusCode, want.Status, want.Proto, want.Header, want.ContentLength, want.Close, want.TransferEncoding, want.Trailer)
	}
	wantBody, wantErr := io.ReadAll(want.Body)
	body, err := io.ReadAll(&lengthBody{r: bufio.NewReader(bytes.NewReader(data[n:])), n: resp.ContentLength})
	if !bytes.Equal(body, wantBody) || (err == nil) != (wantErr == nil) {
		t.Fatalf("%q: body %q (%v), net/http %q (%v)", data, body, err, wantBody, wantErr)
	}
}

func FuzzResponseHead(f *testing.F) {
	for _, s := range responseHeadSeeds {
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, data []byte, head bool) {
		method := http.MethodGet
		if head {
			method = http.MethodHead
		}
		checkResponseHead(t, data, method)
	})
}
