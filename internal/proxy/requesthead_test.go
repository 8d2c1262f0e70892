package proxy

import (
	"bufio"
	"bytes"
	"net/http"
	"reflect"
	"testing"
)

// requestHeadSeeds: the common requests, and what parseRequestHead leaves
// to net/http (own[i] says which it takes).
var requestHeadSeeds = []struct {
	raw string
	own bool
}{
	{"GET / HTTP/1.1\r\nHost: vm1.microvm.localhost\r\nUser-Agent: Go-http-client/1.1\r\nX-aws-proxy-auth: tok\r\nAccept-Encoding: gzip\r\n\r\n", true},
	{"DELETE /a/b?c=d&e=%20 HTTP/1.1\r\nhost: vm1:8443\r\ncookie: a=1\r\nCookie: b=2\r\nX-Weird-Name_1: v \t\r\n\r\nGET / HTTP/1.1\r\n", true},
	{"GET //evil.example/x HTTP/1.1\r\nHost: vm1\r\n\r\n", true},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nX-Obs: caf\xe9\r\n\r\n", true},
	{"GET http://other/x HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET * HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"CONNECT /x HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET /x HTTP/1.0\r\nHost: vm1\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nHost: vm2\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\n\r\n", false},
	{"POST /x HTTP/1.1\r\nHost: vm1\r\nContent-Length: 3\r\n\r\nabc", false},
	{"POST /x HTTP/1.1\r\nHost: vm1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nConnection: close\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nExpect: 100-continue\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nPragma: no-cache\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nX: a\r\n b\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\n Host: vm1\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost : vm1\r\n\r\n", false},
	{"GET /x HTTP/1.1\nHost: vm1\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nX: a\rb\r\n\r\n", false},
	{"GET  /x HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET /x  HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET /x y HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"G(T /x HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET /x\x7f HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: vm1\r\nX\x00: y\r\n\r\n", false},
	{"GET /%zz HTTP/1.1\r\nHost: vm1\r\n\r\n", false},
}

func TestRequestHead(t *testing.T) {
	for i, s := range requestHeadSeeds {
		_, _, ok := parseRequestHead([]byte(s.raw))
		if ok != s.own {
			t.Errorf("seed %d %q: own parser %v, want %v", i, s.raw, ok, s.own)
		}
		checkRequestHead(t, []byte(s.raw))
	}
}

// checkRequestHead holds parseRequestHead to net/http: whatever it
// parses, http.ReadRequest parses alike and ends at the same byte.
func checkRequestHead(t *testing.T, data []byte) {
	t.Helper()
	r, n, ok := parseRequestHead(data)
	if !ok {
		return
	}
	br := bufio.NewReader(bytes.NewReader(data))
	want, err := http.ReadRequest(br)
	if err != nil {
		t.Fatalf("own parser took %q, net/http refused it: %v", data, err)
	}
	if r.Method != want.Method || !reflect.DeepEqual(r.URL, want.URL) || r.Proto != want.Proto ||
		r.ProtoMajor != want.ProtoMajor || r.ProtoMinor != want.ProtoMinor || r.Host != want.Host ||
		r.RequestURI != want.RequestURI || r.ContentLength != want.ContentLength || r.Close != want.Close ||
		len(want.TransferEncoding) != 0 || want.Trailer != nil || want.Body != http.NoBody ||
		!reflect.DeepEqual(r.Header, want.Header) {
		t.Fatalf("%q:\nown      %s %#v %s host=%q %v\nnet/http %s %#v %s host=%q %v cl=%d close=%v te=%v",
			data, r.Method, r.URL, r.Proto, r.Host, r.Header, want.Method, want.URL, want.Proto, want.Host,
			want.Header, want.ContentLength, want.Close, want.TransferEncoding)
	}
	if rest := len(data) - br.Buffered(); rest != n {
		t.Fatalf("%q: own parser ends at %d, net/http at %d", data, n, rest)
	}
}

func FuzzRequestHead(f *testing.F) {
	for _, s := range requestHeadSeeds {
		f.Add([]byte(s.raw))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkRequestHead(t, data)
	})
}

func TestDirectBodyLen(t *testing.T) {
	for v, want := range map[string]int{"0": 0, "1": 1, "700": 700, "2048": maxDirectBody} {
		if n, ok := directBodyLen(v); !ok || n != want {
			t.Errorf("directBodyLen(%q) = %d, %v; want %d", v, n, ok, want)
		}
	}
	for _, v := range []string{"", "2049", "99999", "999999999999999999999", "05", "00", "+5", "-5", " 5", "5 ", "5 5", "5,5", "0x5", "5\t", "٥"} {
		if n, ok := directBodyLen(v); ok {
			t.Errorf("directBodyLen(%q) = %d, true; want the general path", v, n)
		}
	}
}
