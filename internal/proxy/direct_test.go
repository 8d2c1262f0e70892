package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// guestAnswers are what the scripted guest of TestDirectSameAsGeneral
// answers, chosen by the request's X-Answer field (default "plain").
// "close" after an answer: the guest ends the connection there.
var guestAnswers = map[string]string{
	"plain":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello",
	"reason":     "HTTP/1.1 200 Fine Thanks\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"sniff":      "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n<html>hi</html",
	"empty":      "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
	"cookies":    "HTTP/1.1 200 OK\r\nSet-Cookie: " + CookieAuth + "=planted; Path=/\r\nSet-Cookie: app=1\r\nset-cookie: KILN-PROXY-AUTH =x\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\nTe: trailers\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"dup":        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-D: 1\r\nx-d: 2\r\nX-D: 3\r\nContent-Length: 2\r\n\r\nok",
	"date":       "HTTP/1.1 200 OK\r\nDate: Mon, 02 Jan 2006 15:04:05 GMT\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"204":        "HTTP/1.1 204 No Content\r\nX-App: 1\r\n\r\n",
	"304":        "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
	"500":        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
	"chunked":    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
	"trailer":    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTrailer: X-T\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
	"hints":      "HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"sse":        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 10\r\n\r\ndata: x\n\n\n",
	"dupcl":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
	"badcl":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
	"closehdr":   "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
	"upgrade":    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	"short":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nshort",
	"midhead":    "HTTP/1.1 200 OK\r\nContent-",
	"junk":       "garbage\r\n\r\n",
	"http10":     "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"split":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Bad: a\nb\r\nContent-Length: 2\r\n\r\nok",
	"nothing":    "",
	"bigheader":  "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Big: " + strings.Repeat("b", 40<<10) + "\r\nContent-Length: 2\r\n\r\nok",
	"bigbody":    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n" + strings.Repeat("0123456789", 10000),
	"toend":      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end",
	"head":       "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
	"encoding":   "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
	"twotypes":   "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nok",
	"obsfold":    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Fold: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
	"spacename":  "HTTP/1.1 200 OK\r\nContent-Type : text/plain\r\nContent-Length: 2\r\n\r\nok",
	"lowercase":  "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nx-lower: 1\r\n\r\nok",
	"leadingcl":  "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 002\r\n\r\nok",
	"status999":  "HTTP/1.1 599 Whatever\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	"chunkedbad": "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
	// The proxy keeps the connection, which the guest then closes.
	"idleclose": "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	// More than Content-Length says, in the same write.
	"overlong": "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
	// The same, in a later write, after the proxy read the answer: HEAD's
	// body, and an answer nobody asked for.
	// A body whose rest waits for the test (gateWrite).
	"slowbody":    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 20000\r\n\r\n" + strings.Repeat("a", 9100) + gateWrite + strings.Repeat("b", 10900),
	"headlate":    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n" + splitWrite + "stale",
	"unsolicited": "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok" + splitWrite + "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
}

var closingAnswers = map[string]bool{"short": true, "midhead": true, "junk": true, "nothing": true, "toend": true, "chunkedbad": true, "idleclose": true}

// scriptedGuest is a guest port served by hand: it records each request's
// bytes as it got them and answers from guestAnswers.
type scriptedGuest struct {
	gate  chan struct{} // lets an answer go on past gateWrite
	mu    sync.Mutex
	got   []string
	addr  string
	conns atomic.Int32 // accepted
	// Answers whose late part (after splitWrite) is in the proxy's
	// socket. A count of all answers would also move for an earlier
	// answer whose count came after the client already had it.
	lateIn atomic.Int32
	// Connections it ended after a closing answer, their end of stream
	// in the proxy's socket.
	closed atomic.Int32
}

func startScriptedGuest(t *testing.T) *scriptedGuest {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	g := &scriptedGuest{addr: ln.Addr().String(), gate: make(chan struct{}, 1)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			g.conns.Add(1)
			go g.serve(c)
		}
	}()
	return g
}

func (g *scriptedGuest) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		if b, err := br.Peek(1); err != nil || b[0] == 0x16 {
			return // gone, or speaksTLS's probe: this guest speaks plain HTTP
		}
		if b, _ := br.Peek(3); string(b) == "PRI" {
			return // h2c (gRPC): nor HTTP/2
		}
		raw, answer, err := readRawRequest(br)
		if err != nil {
			return
		}
		g.mu.Lock()
		g.got = append(g.got, raw)
		g.mu.Unlock()
		parts := strings.Split(guestAnswers[answer], splitWrite)
		for i, part := range parts {
			if i > 0 {
				time.Sleep(30 * time.Millisecond) // the proxy has read the answer
			}
			for j, piece := range strings.Split(part, gateWrite) {
				if j > 0 {
					<-g.gate
				}
				if _, err := io.WriteString(c, piece); err != nil {
					return
				}
			}
		}
		if len(parts) > 1 {
			// A write's return does not put its bytes in the proxy's socket
			// yet (loopback delivers them from softirq, later under load):
			// wait until they are.
			waitDelivered(c)
			g.lateIn.Add(1)
		}
		if closingAnswers[answer] {
			// The end of stream is in the proxy's socket before it counts.
			if tc, ok := c.(*net.TCPConn); ok {
				tc.CloseWrite()
				waitDelivered(c)
			}
			g.closed.Add(1)
			return
		}
	}
}

func (g *scriptedGuest) take() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	got := g.got
	g.got = nil
	return got
}

// readRawRequest reads one request's bytes (head, and a body by
// Content-Length or chunked) and the answer it asks for.
func readRawRequest(br *bufio.Reader) (raw, answer string, err error) {
	var b strings.Builder
	answer = "plain"
	cl, chunked := 0, false
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return "", "", err
		}
		b.WriteString(line)
		if line == "\r\n" {
			break
		}
		k, v, _ := strings.Cut(strings.TrimRight(line, "\r\n"), ":")
		v = strings.TrimSpace(v)
		switch strings.ToLower(k) {
		case "x-answer":
			answer = v
		case "content-length":
			cl, _ = strconv.Atoi(v)
		case "transfer-encoding":
			chunked = true
		}
	}
	if chunked {
		for !strings.HasSuffix(b.String(), "\r\n0\r\n\r\n") {
			c, err := br.ReadByte()
			if err != nil {
				return "", "", err
			}
			b.WriteByte(c)
		}
	} else if cl > 0 {
		body := make([]byte, cl)
		if _, err := io.ReadFull(br, body); err != nil {
			return "", "", err
		}
		b.Write(body)
	}
	return b.String(), answer, nil
}

// runningBackend: every known VM runs (RunningNow), as the engine
// reports a running VM from memory, but for the answers queued in next,
// one per call.
type runningBackend struct {
	*fakeBackend
	next chan bool
}

func (b runningBackend) RunningNow(string) bool {
	select {
	case yes := <-b.next:
		return yes
	default:
		return true
	}
}

// normalizeHead is a head with its field lines in a stable order by
// name (the general path writes a map's fields in random order; the
// values of one name keep theirs) and without Date, which changes by
// the second.
func normalizeHead(head string) string {
	lines := strings.Split(strings.TrimSuffix(head, "\r\n\r\n"), "\r\n")
	fields := slices.DeleteFunc(lines[1:], func(l string) bool { return strings.HasPrefix(strings.ToLower(l), "date:") })
	slices.SortStableFunc(fields, func(a, b string) int {
		ka, _, _ := strings.Cut(a, ":")
		kb, _, _ := strings.Cut(b, ":")
		return strings.Compare(strings.ToLower(ka), strings.ToLower(kb))
	})
	return lines[0] + "\n" + strings.Join(fields, "\n")
}

// directEnv is a proxy with a backend whose VMs run, in front of a
// scriptedGuest on every port.
type directEnv struct {
	g      *scriptedGuest
	srv    *Server
	ln     net.Listener
	roots  *x509.CertPool
	signer *token.Signer
	fb     *fakeBackend
	next   chan bool // RunningNow's next answers
}

func newDirectEnv(t *testing.T) *directEnv {
	g := startScriptedGuest(t)
	ca, roots, signer := testPKI(t)
	lo := netip.MustParseAddr("127.0.0.1")
	fb := &fakeBackend{ensures: map[string]int{}, open: map[string]int{}, vms: map[string]*fakeVM{
		"vm1":       {tgt: Target{Account: "acct", Addr: lo, Ingress: true, Shell: true}},
		"noingress": {tgt: Target{Account: "acct", Addr: lo}},
		"otheracct": {tgt: Target{Account: "other", Addr: lo, Ingress: true}},
	}}
	next := make(chan bool, 8)
	srv, ln := serveProxy(t, Config{Domain: domain, Backend: runningBackend{fb, next}, Tokens: signer,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, g.addr)
		}}, ca)

	return &directEnv{g, srv, ln, roots, signer, fb, next}
}

// TestDirectSameAsGeneral sends the same requests, plain and hostile,
// through the direct path and through the general one (Server.noDirect)
// and compares what the guest receives (its bytes, fields in a stable
// order) and what the client gets (status, fields but Date, body, and
// whether the connection serves a next request). It also checks that the
// plain ones did take the direct path.
func TestDirectSameAsGeneral(t *testing.T) {
	e := newDirectEnv(t)
	g, srv, ln, roots, signer := e.g, e.srv, e.ln, e.roots, e.signer
	mint := func(vm string, kind token.Kind, ports ...token.PortRange) string {
		tok, _, err := signer.Mint("acct", vm, kind, ports, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tok := mint("vm1", token.KindEndpoint, token.AllPorts)
	host := "vm1." + domain
	auth := "X-Aws-Proxy-Auth: " + tok + "\r\n"
	get := func(extra string) string { return "GET / HTTP/1.1\r\nHost: " + host + "\r\n" + auth + extra + "\r\n" }
	post := func(method, extra, body string) string {
		return method + " /x HTTP/1.1\r\nHost: " + host + "\r\n" + auth + extra + "\r\n" + body
	}
	var bin [256]byte
	for i := range bin {
		bin[i] = byte(i)
	}
	binary := string(bin[:])
	cookie := func(fields ...string) string { // no token field: a Cookie field of each
		req := "GET / HTTP/1.1\r\nHost: " + host + "\r\n"
		for _, f := range fields {
			req += "Cookie: " + f + "\r\n"
		}
		return req + "\r\n"
	}
	type tc struct {
		name, req string
		direct    bool // the direct path must take it (else it must not)
		either    bool // it may or may not
	}
	// A streamed answer the guest breaks off: ReverseProxy (the general
	// path of a body) flushes a stream's head at once, forwardH1's writer
	// (the direct path's) with its first bytes, so the client gets the
	// head or nothing; it must get no whole answer from either.
	broken := map[string]bool{"body, answer chunkedbad": true}
	cases := []tc{
		{"plain", get("User-Agent: t\r\nAccept: */*\r\n"), true, false},
		{"query", "GET /a/b?x=1&y=%20z HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", true, false},
		{"escaped path", "GET /a%20b/c;d=1/%2F@:$+, HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", true, false},
		{"path net/url rewrites", "GET /a!b*(c)'#f HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", false, false},
		{"query to clean", "GET /?a=1;b=2&c=%zz HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", false, false},
		{"HEAD", "HEAD / HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "X-Answer: head\r\n\r\n", true, false},
		{"DELETE", "DELETE /x HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", true, false},
		{"bodyless POST", "POST /x HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "\r\n", true, false},
		{"POST with body", post("POST", "Content-Length: 5\r\n", "hello"), true, false},
		{"PUT with body", post("PUT", "Content-Type: application/json\r\nContent-Length: 7\r\n", `{"a":1}`), true, false},
		{"PATCH with body", post("PATCH", "Content-Length: 2\r\n", "{}"), true, false},
		{"DELETE with body", post("DELETE", "Content-Length: 3\r\n", "abc"), true, false},
		{"GET with body", post("GET", "Content-Length: 3\r\n", "abc"), true, false},
		{"HEAD with body", post("HEAD", "X-Answer: head\r\nContent-Length: 3\r\n", "abc"), true, false},
		{"OPTIONS with body", post("OPTIONS", "Content-Length: 3\r\n", "abc"), true, false},
		{"own method with body", post("FROB", "Content-Length: 3\r\n", "abc"), true, false},
		{"body with Host last", "POST /x HTTP/1.1\r\n" + auth + "Content-Length: 2\r\nHost: " + host + "\r\n\r\nok", true, false},
		{"body with lower-case CL", post("POST", "content-length: 2\r\n", "ok"), true, false},
		{"body, CL with a tab", post("POST", "Content-Length:\t2\t\r\n", "ok"), true, false},
		{"body longer than CL, junk after", post("POST", "Content-Length: 2\r\n", "okJUNK\r\n\r\n"), true, false},
		{"binary body", post("POST", "Content-Length: 256\r\n", binary), true, false},
		{"body, two User-Agents", post("POST", "User-Agent: a\r\nUser-Agent: b\r\nContent-Length: 2\r\n", "ok"), true, false},
		{"body, empty User-Agent first", post("POST", "User-Agent:\r\nUser-Agent: b\r\nContent-Length: 2\r\n", "ok"), true, false},
		{"body, token cookie", "POST /x HTTP/1.1\r\nHost: " + host + "\r\nCookie: a=1; " + CookieAuth + "=" + tok + "\r\nContent-Length: 2\r\n\r\nok", true, false},
		{"CL 0", post("POST", "Content-Length: 0\r\n", ""), true, false},
		{"CL 0, GET", post("GET", "Content-Length: 0\r\n", ""), true, false},
		{"CL 1", post("POST", "Content-Length: 1\r\n", "x"), true, false},
		{"CL 700", post("POST", "Content-Length: 700\r\n", strings.Repeat("b", 700)), true, false},
		// crypto/tls's client sends a new connection's first data in
		// records of ~1.2 KiB: a body at the bound is in a later one.
		{"CL at the bound", post("POST", "Content-Length: "+strconv.Itoa(maxDirectBody)+"\r\n", strings.Repeat("b", maxDirectBody)), false, true},
		{"CL over the bound", post("POST", "Content-Length: "+strconv.Itoa(maxDirectBody+1)+"\r\n", strings.Repeat("b", maxDirectBody+1)), false, false},
		{"CL spaced", post("POST", "Content-Length:   5 \r\n", "hello"), true, false},
		{"CL with plus", post("POST", "Content-Length: +5\r\n", "hello"), false, false},
		{"CL leading zero", post("POST", "Content-Length: 05\r\n", "hello"), false, false},
		{"CL space inside", post("POST", "Content-Length: 5 5\r\n", "hello"), false, false},
		{"CL list", post("POST", "Content-Length: 5, 5\r\n", "hello"), false, false},
		{"CL hex", post("POST", "Content-Length: 0x5\r\n", "hello"), false, false},
		{"two CLs", post("POST", "Content-Length: 5\r\nContent-Length: 5\r\n", "hello"), false, false},
		{"two CLs differing", post("POST", "Content-Length: 5\r\nContent-Length: 3\r\n", "hello"), false, false},
		{"TE and CL", post("POST", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"), false, false},
		{"CL obs-fold", post("POST", "Content-Length:\r\n 5\r\n", "hello"), false, false},
		{"CL bare LF", "POST /x HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Content-Length: 5\n\r\nhello", false, false},
		{"body with Expect", post("POST", "Expect: 100-continue\r\nContent-Length: 5\r\n", "hello"), false, false},
		{"body with Connection", post("POST", "Connection: keep-alive\r\nContent-Length: 5\r\n", "hello"), false, false},
		{"body without a token", "POST /x HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 5\r\n\r\nhello", false, false},
		{"body with a bad token", "POST /x HTTP/1.1\r\nHost: " + host + "\r\nX-Aws-Proxy-Auth: nope\r\nContent-Length: 5\r\n\r\nhello", false, false},
		// A body still coming (another TLS record) streams on the general path.
		{"body in a later record", post("POST", "Content-Length: 5\r\n", splitWrite+"hello"), false, false},
		{"body split across records", post("POST", "Content-Length: 5\r\n", "he"+splitWrite+"llo"), false, false},
		{"body then a pipelined request", post("POST", "Content-Length: 5\r\n", "hello") + get("X-Answer: reason\r\n"), true, false},
		{"body then a pipelined body", post("POST", "Content-Length: 5\r\n", "hello") + post("PUT", "Content-Length: 2\r\nX-Answer: reason\r\n", "ok"), true, false},
		{"CL over pipelined bytes", post("POST", "Content-Length: 9\r\n", "hello") + get(""), true, false},
		{"chunked body", "POST /x HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false, false},
		{"duplicate fields", get("X-A: 1\r\nx-a: 2\r\nX-B: 1\r\nX-A: 3\r\n"), true, false},
		{"empty and spaced values", get("X-E:\r\nX-S:   s  \r\nX-T:\tt\t\r\nUser-Agent:\r\n"), true, false},
		{"token cookie and header", get("Cookie: a=1; " + CookieAuth + "=" + tok + ";b=2 ;  ; " + CookieAuth + " = x\r\n"), true, false},
		{"only token cookie", get("Cookie: " + CookieAuth + "=" + tok + "\r\n"), true, false},
		{"two cookie fields", get("Cookie: a=1\r\nCookie: b=2; " + CookieAuth + "=x\r\n"), true, false},
		// A browser's token is in the cookie only: the token the general
		// path picks (header, else the first valid token cookie) decides.
		{"cookie token alone", cookie(CookieAuth + "=" + tok + "; a=1"), true, false},
		{"cookie token among others", cookie("a=1; " + CookieAuth + "=" + tok + ";b=2 ;  ; c"), true, false},
		{"cookie token spaced name", cookie("a=1;  " + CookieAuth + " =" + tok + " ; b=2"), true, false},
		{"cookie token spaced value", cookie(CookieAuth + "= " + tok), false, false},
		{"cookie token quoted", cookie(CookieAuth + "=\"" + tok + "\"; a=\"1\""), true, false},
		{"cookie token quoted once", cookie(CookieAuth + "=\"" + tok), false, false},
		{"cookie token empty", cookie(CookieAuth + "=; " + CookieAuth + "=" + tok), false, false},
		{"cookie token without =", cookie(CookieAuth + "; " + CookieAuth + "=" + tok), false, false},
		{"two token cookies", cookie(CookieAuth + "=" + tok + "; " + CookieAuth + "=nope"), true, false},
		{"two token cookies, bad first", cookie(CookieAuth + "=nope; " + CookieAuth + "=" + tok), false, false},
		{"cookie token after invalid ones", cookie(CookieAuth + "=a\\b; " + CookieAuth + "=a\"b; " + CookieAuth + "=\x80; " + CookieAuth + "=" + tok), true, false},
		{"cookie token in the second field", cookie("a=1", CookieAuth+"="+tok, "b=2"), true, false},
		{"two token cookie fields, bad first", cookie(CookieAuth+"=nope", CookieAuth+"="+tok), false, false},
		{"cookie token name in upper case", cookie(strings.ToUpper(CookieAuth) + "=" + tok), false, false},
		{"cookie token, bad header token", "GET / HTTP/1.1\r\nHost: " + host + "\r\nX-Aws-Proxy-Auth: nope\r\nCookie: " + CookieAuth + "=" + tok + "\r\n\r\n", false, false},
		{"cookie token, empty header token", "GET / HTTP/1.1\r\nHost: " + host + "\r\nX-Aws-Proxy-Auth:\r\nCookie: " + CookieAuth + "=" + tok + "\r\n\r\n", true, false},
		{"bad cookie token, header token", get("Cookie: " + CookieAuth + "=nope; a=1\r\n"), true, false},
		{"cookie token, too many cookies", cookie(strings.Repeat("a=1; ", maxDirectCookies) + CookieAuth + "=" + tok), false, false},
		{"cookie token of another VM", "GET / HTTP/1.1\r\nHost: otheracct." + domain + "\r\nCookie: " + CookieAuth + "=" + tok + "\r\n\r\n", false, false},
		{"cookie token for port 8080 only", "GET / HTTP/1.1\r\nHost: " + host + "\r\nCookie: " + CookieAuth + "=" + mint("vm1", token.KindEndpoint, token.Port(8080)) + "\r\nX-Aws-Proxy-Port: 9000\r\n\r\n", false, false},
		{"cookie token, subprotocols", "GET / HTTP/1.1\r\nHost: " + host + "\r\nCookie: " + CookieAuth + "=" + tok + "\r\nSec-WebSocket-Protocol: chat\r\n\r\n", false, false},
		{"subprotocol token", "GET / HTTP/1.1\r\nHost: " + host + "\r\nSec-WebSocket-Protocol: " + SubprotoAuth + tok + ", chat\r\n\r\n", false, false},
		{"subprotocols with header token", get("Sec-WebSocket-Protocol: " + SubprotoBase + ", chat\r\n"), false, false},
		{"kiln fields", get("X-Aws-Proxy-Port: 8080\r\nX-Aws-Proxy-Other: 1\r\nx-aws-proxy-lower: 2\r\nX-AWS-PROXY-UPPER: 3\r\n"), true, false},
		{"force h2 field", get("X-Aws-Proxy-Force-H2: false\r\n"), false, false},
		{"hop-by-hop", get("Keep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n"), true, false},
		{"Te", get("Te: trailers, deflate\r\n"), false, false},
		{"Connection", get("Connection: X-Hop, keep-alive\r\nX-Hop: secret\r\n"), false, false},
		{"Upgrade", get("Upgrade: websocket\r\n"), false, false},
		{"planted forwarding", get("X-Forwarded-For: 203.0.113.9\r\nForwarded: for=x\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: http\r\n"), true, false},
		{"E2B traffic token", get("E2b-Traffic-Access-Token: secret\r\n"), true, false},
		{"E2B sandbox headers", get("E2b-Sandbox-Id: vm1\r\nE2b-Sandbox-Port: 8080\r\n"), false, false},
		{"E2B port only", get("E2b-Sandbox-Port: 9\r\n"), true, false},
		{"E2B host", "GET / HTTP/1.1\r\nHost: 8080-vm1." + domain + "\r\n" + auth + "\r\n", false, false},
		{"CL and TE", "POST / HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false, false},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: " + host + "\r\nHost: evil\r\n" + auth + "\r\n", false, false},
		{"bad Host", "GET / HTTP/1.1\r\nHost: vm1." + domain + "\"\r\n" + auth + "\r\n", false, false},
		{"upper-case Host", "GET / HTTP/1.1\r\nHost: VM1." + strings.ToUpper(domain) + ":443\r\n" + auth + "\r\n", true, false},
		{"obs-fold", get("X-Fold: a\r\n b\r\n"), false, false},
		{"bare LF", "GET / HTTP/1.1\nHost: " + host + "\n" + strings.TrimSuffix(auth, "\r\n") + "\n\n", false, false},
		{"space before colon", get("X-Sp : 1\r\n"), false, false},
		// The own parsers take a head in the loop's buffer as one read
		// brought it; crypto/tls's client sends a new connection's first
		// data in small records.
		{"big header", get(strings.Repeat("X-Big: "+strings.Repeat("b", 1000)+"\r\n", 2)), false, true},
		{"header over the buffer", get(strings.Repeat("X-Big: "+strings.Repeat("b", 1000)+"\r\n", 40)), false, false},
		{"header over the limit", get("X-Huge: " + strings.Repeat("h", 70<<10) + "\r\n"), false, false},
		{"no token", "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n", false, false},
		{"bad token", "GET / HTTP/1.1\r\nHost: " + host + "\r\nX-Aws-Proxy-Auth: nope\r\n\r\n", false, false},
		{"two tokens", get("X-Aws-Proxy-Auth: " + tok + "\r\n"), false, false},
		{"token of another VM", "GET / HTTP/1.1\r\nHost: otheracct." + domain + "\r\n" + auth + "\r\n", false, false},
		{"other account", "GET / HTTP/1.1\r\nHost: otheracct." + domain + "\r\nX-Aws-Proxy-Auth: " + mint("otheracct", token.KindEndpoint, token.AllPorts) + "\r\n\r\n", false, false},
		{"no ingress", "GET / HTTP/1.1\r\nHost: noingress." + domain + "\r\nX-Aws-Proxy-Auth: " + mint("noingress", token.KindEndpoint, token.AllPorts) + "\r\n\r\n", false, false},
		{"unknown VM", "GET / HTTP/1.1\r\nHost: ghost." + domain + "\r\nX-Aws-Proxy-Auth: " + mint("ghost", token.KindEndpoint, token.AllPorts) + "\r\n\r\n", false, false},
		{"token for port 8080 only", "GET / HTTP/1.1\r\nHost: " + host + "\r\nX-Aws-Proxy-Auth: " + mint("vm1", token.KindEndpoint, token.Port(8080)) + "\r\nX-Aws-Proxy-Port: 9000\r\n\r\n", false, false},
		{"shell port", get("X-Aws-Proxy-Port: 8022\r\n"), false, false},
		{"bad port", get("X-Aws-Proxy-Port: 0x10\r\n"), false, false},
		{"query token link", "GET /p?" + QueryAuth + "=" + tok + "&a=1 HTTP/1.1\r\nHost: " + host + "\r\n\r\n", false, false},
		{"unknown host", "GET / HTTP/1.1\r\nHost: example.com\r\n" + auth + "\r\n", false, false},
		{"HTTP/1.0", "GET / HTTP/1.0\r\nHost: " + host + "\r\n" + auth + "\r\n", false, false},
		{"Expect", "POST / HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "Expect: 100-continue\r\nContent-Length: 2\r\n\r\nok", false, false},
	}
	for name := range guestAnswers {
		if name == "head" {
			continue
		}
		cases = append(cases, tc{"answer " + name, get("X-Answer: " + name + "\r\n"), true, false})
		cases = append(cases, tc{"body, answer " + name, post("POST", "X-Answer: "+name+"\r\nContent-Length: 5\r\n", "hello"), true, false})
	}
	cases = append(cases, tc{"HEAD answered with a body", "HEAD / HTTP/1.1\r\nHost: " + host + "\r\n" + auth + "X-Answer: plain\r\n\r\n", true, false})
	slices.SortStableFunc(cases, func(a, b tc) int { return strings.Compare(a.name, b.name) })

	// The first request probes the guest port for TLS (speaksTLS), which
	// the direct path then finds remembered.
	roundTrip(t, ln.Addr().String(), roots, get(""))
	g.take()

	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// A guest that broke protocol (a body to HEAD) spoils its
			// connection for the next request: each run starts afresh.
			srv.closeIdle()
			srv.noDirect.Store(true)
			wantClient := roundTrip(t, ln.Addr().String(), roots, c.req)
			wantGuest := g.take()
			srv.closeIdle()
			srv.noDirect.Store(false)
			taken.Store(0)
			gotClient := roundTrip(t, ln.Addr().String(), roots, c.req)
			gotGuest := g.take()
			if c.either {
			} else if c.direct && taken.Load() == 0 {
				t.Errorf("the direct path did not take it")
			}
			if !c.direct && taken.Load() > 0 {
				t.Errorf("the direct path took it")
			}
			if broken[c.name] {
				for _, answer := range []string{gotClient, wantClient} {
					if !strings.Contains(answer, "no answer") && !strings.Contains(answer, "err unexpected EOF") || strings.Contains(answer, "[1]") {
						t.Errorf("the client got a whole answer:\n%s", answer)
					}
				}
			} else if gotClient != wantClient {
				t.Errorf("the client got\n%s\n\nthe general path answers\n%s", gotClient, wantClient)
			}
			if len(gotGuest) != len(wantGuest) {
				t.Fatalf("the guest got %d requests, from the general path %d:\n%q\n%q", len(gotGuest), len(wantGuest), gotGuest, wantGuest)
			}
			for i := range gotGuest {
				head, body, _ := strings.Cut(gotGuest[i], "\r\n\r\n")
				whead, wbody, _ := strings.Cut(wantGuest[i], "\r\n\r\n")
				if got, want := normalizeHead(head), normalizeHead(whead); got != want || body != wbody {
					t.Errorf("the guest got\n%s\n%q\n\nfrom the general path\n%s\n%q", got, body, want, wbody)
				}
			}
		})
	}
}

// splitWrite in a request makes roundTrip send it in two writes (two
// TLS records), a moment apart.
const splitWrite = "\x00split\x00"

// gateWrite in a guest answer: the guest writes the rest once the test
// sends on scriptedGuest.gate.
const gateWrite = "\x00gate\x00"

// roundTrip sends req on a new TLS connection and describes what came
// back: the answer's status line, fields (stable order, no Date), body
// or its error, and the answer to a plain request sent after it on the
// same connection (or that there was none).
func roundTrip(t *testing.T, addr string, roots *x509.CertPool, req string) string {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "vm1." + domain, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	for i, part := range strings.Split(req, splitWrite) {
		if i > 0 {
			time.Sleep(20 * time.Millisecond) // the proxy reads the first part alone
		}
		if _, err := io.WriteString(c, part); err != nil {
			t.Fatal(err)
		}
	}
	br := bufio.NewReader(c)
	method, _, _ := strings.Cut(req, " ")
	var out strings.Builder
	for i := range 2 {
		var rec bytes.Buffer
		resp, err := http.ReadResponse(bufio.NewReader(io.TeeReader(br, &rec)), &http.Request{Method: method})
		if err != nil {
			fmt.Fprintf(&out, "[%d] no answer: %v\n", i, err != nil)
			break
		}
		body, berr := io.ReadAll(resp.Body)
		head, _, _ := bytes.Cut(rec.Bytes(), []byte("\r\n\r\n"))
		fmt.Fprintf(&out, "[%d] %s\nbody %q err %v\n", i, normalizeHead(string(head)), body, berr)
		if berr != nil || resp.Close || i == 1 {
			break
		}
		// The answer's reader read ahead of its end into rec only; what
		// br holds is unread. A next, plain request on the connection:
		io.WriteString(c, "GET /next HTTP/1.1\r\nHost: vm1."+domain+"\r\nX-Aws-Proxy-Auth: nope\r\n\r\n")
		method = "GET"
	}
	return out.String()
}

// longBodyWait makes the h2 direct path wait up to 2 s for a body's DATA
// (h2BodyWaitTest) for the rest of the test: Go's client sends them
// after its HEADERS, in a write of their own, and a loaded host can put
// more than the real 2 ms between the two.
func longBodyWait(t *testing.T) {
	h2BodyWaitTest.Store(int64(2 * time.Second))
	t.Cleanup(func() { h2BodyWaitTest.Store(0) })
}

// idleCount is how many guest connections wait in the pool.
func (u *h1Upstream) idleCount() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.nIdle
}

// closeIdle closes the idle guest connections of every pool.
func (s *Server) closeIdle() {
	s.up.closeIdle()
	for _, rp := range []*httputil.ReverseProxy{s.h1, s.h2, s.tls1, s.tls2} {
		rp.Transport.(*http.Transport).CloseIdleConnections()
	}
}

// FuzzDirectHead: for a request the direct path may take, what it writes
// to the guest is what the general path writes (outgoing, writeHead),
// field order aside; and plainURI holds the URI to net/url's rewrite.
func FuzzDirectHead(f *testing.F) {
	for _, s := range requestHeadSeeds {
		f.Add([]byte(s.raw))
	}
	f.Add([]byte("GET /a%20b/c;d?x=%41&y HTTP/1.1\r\nHost: vm1." + domain + "\r\nX-Aws-Proxy-Auth: t\r\nCookie: a=1;" + CookieAuth + "=t\r\nUser-Agent:\r\n\r\n"))
	f.Add([]byte("POST /%2f%2F?; HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1\r\nKeep-Alive: 1\r\nE2b-Traffic-Access-Token: x\r\nx-aws-proxy-x: 1\r\n\r\n"))
	f.Add([]byte("GET //x/../y?a=%zz HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nCookie: ; ;\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: vm1." + domain + "\r\nCookie: a=1;  " + CookieAuth + " =\"t\"\r\nX-A: 1\r\ncookie: " + CookieAuth + "=u; b\r\n\r\n"))
	host := "Host: vm1." + domain + "\r\nX-Aws-Proxy-Auth: t\r\n"
	f.Add([]byte("POST /x HTTP/1.1\r\n" + host + "Content-Length: 5\r\n\r\nhello"))
	f.Add([]byte("PUT /x HTTP/1.1\r\n" + host + "User-Agent: a\r\nuser-agent: b\r\ncontent-length:  3 \r\n\r\n\x00\r\nGET / HTTP/1.1\r\n"))
	f.Add([]byte("GET /x HTTP/1.1\r\n" + host + "User-Agent:\r\nContent-Length: 0\r\n\r\n"))
	f.Add([]byte("PATCH /x HTTP/1.1\r\n" + host + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"))
	f.Add([]byte("POST /x HTTP/1.1\r\n" + host + "Content-Length: 05\r\n\r\nhello"))
	f.Add([]byte("POST /x HTTP/1.1\r\n" + host + "Content-Length: +5\r\n\r\nhello"))
	f.Add([]byte("POST /x HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("DELETE /x HTTP/1.1\r\n" + host + "Content-Length: 9\r\n\r\nhel"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, n, ok := parseReqHead(data, nil)
		if !ok || !validHost(d.host) {
			return
		}
		if d.hasCL {
			sameBodyRequest(t, data, &d, n)
			return
		}
		r, ok := d.request()
		if !ok {
			return
		}
		if plainURI(d.uri) {
			if want := r.URL.RequestURI(); want != d.uri || cleanQuery(r.URL.RawQuery) != r.URL.RawQuery {
				t.Fatalf("plainURI(%q), net/url writes %q", d.uri, want)
			}
		} else {
			return
		}
		for _, k := range []string{"Te", fieldWSProtocol} {
			if _, ok := r.Header[k]; ok {
				return // not for the direct path
			}
		}
		sameCookieToken(t, string(data), r, &d)
		r.RemoteAddr, r.TLS = "192.0.2.7:4000", &tls.ConnectionState{}
		d.remoteIP, d.https = "192.0.2.7", true
		sameGuestHead(t, string(data), r, &d)
	})
}

// sameBodyRequest fails unless a request with a Content-Length that
// parseReqHead takes is one http.ReadRequest reads alike (the general
// path's parser: the direct path skips checkRequest), and the direct path
// writes for it, head and body, what ReverseProxy's http.Transport
// writes (Request.Write of outgoing's request, without a default
// User-Agent, as ReverseProxy sends it).
func sameBodyRequest(t *testing.T, data []byte, d *reqHead, n int) {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
	if err != nil {
		t.Fatalf("%q: parseReqHead takes it, http.ReadRequest: %v", data, err)
	}
	if r.ContentLength != int64(d.cl) || len(r.TransferEncoding) > 0 || r.Method != d.method || r.RequestURI != d.uri || r.Host != d.host {
		t.Fatalf("%q: http.ReadRequest reads %s %s host %q length %d %v", data, r.Method, r.RequestURI, r.Host, r.ContentLength, r.TransferEncoding)
	}
	if msg := checkRequest(r, data[:n]); msg != "" {
		t.Fatalf("%q: checkRequest: %s", data, msg)
	}
	if len(data) < n+d.cl || !plainURI(d.uri) {
		return // the direct path leaves it
	}
	for _, k := range []string{"Te", fieldWSProtocol} {
		if _, ok := r.Header[k]; ok {
			return // not for the direct path
		}
	}
	d.body = data[n : n+d.cl]
	r.RemoteAddr, r.TLS = "192.0.2.7:4000", &tls.ConnectionState{}
	d.remoteIP, d.https = "192.0.2.7", true
	if d.cl == 0 { // no body: the general path's is forwardH1's writeHead
		sameGuestHead(t, string(data), r, d)
		return
	}
	sameBodyGuest(t, string(data), r, d)
}

// sameBodyGuest fails unless the direct path writes for d, with its
// body, what the general path writes for r through http.Transport
// (outgoing, Request.Write, which sends an empty User-Agent as
// ReverseProxy sets it), field order aside.
func sameBodyGuest(t *testing.T, input string, r *http.Request, d *reqHead) {
	t.Helper()
	if strings.Trim(strings.ToLower(d.host), "abcdefghijklmnopqrstuvwxyz0123456789.-:") != "" {
		return // not a microVM's endpoint host (Request.write rewrites some)
	}
	out := outgoing(r, &url.URL{Scheme: "http", Host: "127.0.0.1:8080"}, true)
	out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(d.body)), int64(d.cl)
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header.Set("User-Agent", "")
	}
	var general, direct bytes.Buffer
	if err := out.Write(&general); err != nil {
		t.Fatal(err)
	}
	bw := bufio.NewWriter(&direct)
	if err := d.writeHead(bw); err != nil {
		t.Fatal(err)
	}
	bw.Flush()
	ghead, gbody, _ := strings.Cut(general.String(), "\r\n\r\n")
	dhead, dbody, _ := strings.Cut(direct.String(), "\r\n\r\n")
	if got, want := normalizeHead(dhead), normalizeHead(ghead); got != want || dbody != gbody {
		t.Fatalf("%q:\ndirect\n%s\n%q\ngeneral\n%s\n%q", input, got, dbody, want, gbody)
	}
}

// sameCookieToken fails unless the direct path reads from d the token
// cookie the general path reads from r (when it reads one at all).
func sameCookieToken(t *testing.T, input string, r *http.Request, d *reqHead) {
	t.Helper()
	tok, ok := cookieToken(d.fields)
	want := ""
	if c, err := r.Cookie(CookieAuth); err == nil {
		want = c.Value
	}
	if ok && tok != want {
		t.Fatalf("%q: cookieToken %q, the general path %q", input, tok, want)
	}
}

// sameGuestHead fails unless the direct path writes for d what the
// general path writes for r (outgoing, writeHead), field order aside,
// and the guest can read it.
func sameGuestHead(t *testing.T, input string, r *http.Request, d *reqHead) {
	t.Helper()
	var general, direct strings.Builder
	bw := bufio.NewWriter(&general)
	if err := writeHead(bw, outgoing(r, &url.URL{Scheme: "http", Host: "127.0.0.1:8080"}, true)); err != nil {
		t.Fatal(err)
	}
	bw.Flush()
	bw = bufio.NewWriter(&direct)
	if err := d.writeHead(bw); err != nil {
		t.Fatal(err)
	}
	bw.Flush()
	if got, want := normalizeHead(direct.String()), normalizeHead(general.String()); got != want {
		t.Fatalf("%q:\ndirect\n%s\ngeneral\n%s", input, got, want)
	}
	if _, err := http.ReadRequest(bufio.NewReader(strings.NewReader(direct.String()))); err != nil {
		t.Fatalf("the guest cannot read %q: %v", direct.String(), err)
	}
}

// TestDirectSameAsGeneralH2 is TestDirectSameAsGeneral for h2 streams,
// with what Go's HTTP/2 client lets one send.
func TestDirectSameAsGeneralH2(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, err := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	other, _, _ := e.signer.Mint("acct", "otheracct", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots}, ForceAttemptHTTP2: true, DisableCompression: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, e.ln.Addr().String())
		}}, Timeout: 5 * time.Second}
	type tc struct {
		name, method, url string
		hdr               http.Header
		direct            bool
		either            bool // it may or may not take the direct path
		racy              bool // the general path's answer is not always the same
		// A request body: Go's client sends its content-length unless
		// noLen, in DATA frames after the HEADERS; trailer adds one.
		body           string
		noLen, trailer bool
		// frames, if set, is the stream as a hand-driven client sends it
		// (h2Frames), for what Go's client never sends.
		frames []h2Step
	}
	base := "https://vm1." + domain
	noAuth := func(k string, v ...string) http.Header { return http.Header{HeaderAuth: {""}, k: v} }
	var bin [256]byte
	for i := range bin {
		bin[i] = byte(i)
	}
	json := `{"cmd":"ls","args":["-l"]}`
	bound := strings.Repeat("b", maxDirectBody)
	post := func(cl string, steps ...h2Step) []h2Step {
		fields := []string{strings.ToLower(HeaderAuth), tok, "x-answer", "reason"}
		if cl != "" {
			fields = append(fields, "content-length", cl)
		}
		return append([]h2Step{{kind: "headers", fields: fields}}, steps...)
	}
	data := func(p string, end bool) h2Step { return h2Step{kind: "data", data: p, end: end} }
	pause := h2Step{kind: "pause"}
	simple := func(name, method, url string, hdr http.Header, direct bool) tc {
		return tc{name: name, method: method, url: url, hdr: hdr, direct: direct}
	}
	cases := []tc{
		{name: "POST with body", method: "POST", url: base + "/x", body: "hello", direct: true},
		{name: "PUT with JSON", method: "PUT", url: base + "/x", hdr: http.Header{"Content-Type": {"application/json"}}, body: json, direct: true},
		{name: "PATCH with body", method: "PATCH", url: base + "/x", body: "{}", direct: true},
		{name: "DELETE with body", method: "DELETE", url: base + "/x", body: "abc", direct: true},
		{name: "GET with body", method: "GET", url: base + "/x", body: "abc", direct: true},
		{name: "OPTIONS with body", method: "OPTIONS", url: base + "/x", body: "abc", direct: true},
		{name: "own method with body", method: "FROB", url: base + "/x", body: "abc", direct: true},
		{name: "binary body", method: "POST", url: base + "/x", body: string(bin[:]), direct: true},
		{name: "body of 1", method: "POST", url: base + "/x", body: "x", direct: true},
		{name: "body at the bound", method: "POST", url: base + "/x", body: bound, direct: true},
		{name: "body over the bound", method: "POST", url: base + "/x", body: bound + "b"},
		{name: "body without content-length", method: "POST", url: base + "/x", body: "hello", noLen: true},
		{name: "body with a trailer", method: "POST", url: base + "/x", body: "hello", trailer: true},
		{name: "body, token cookie", method: "POST", url: base + "/x", hdr: noAuth("Cookie", "a=1; "+CookieAuth+"="+tok), body: "ok", direct: true},
		{name: "body, bad token", method: "POST", url: base + "/x", hdr: http.Header{HeaderAuth: {"nope"}}, body: "ok"},
		{name: "body, gRPC type", method: "POST", url: base + "/x", hdr: http.Header{"Content-Type": {"application/grpc"}}, body: "ok"},
		{name: "body, shell port", method: "POST", url: base + "/x", hdr: http.Header{"X-Aws-Proxy-Port": {"8022"}}, body: "ok"},
		// What Go's client never sends.
		{name: "frames: body in two DATA frames", frames: post("5", data("he", false), data("llo", true)), direct: true},
		{name: "frames: body, then an empty END_STREAM", frames: post("5", data("hello", false), data("", true)), direct: true},
		{name: "frames: padded DATA", frames: post("5", h2Step{kind: "padded", data: "hello", end: true}), direct: true},
		{name: "frames: two user-agents", frames: post("2", h2Step{}, data("ok", true)), direct: true},
		{name: "frames: body after a pause", frames: post("5", pause, data("hello", true))},
		{name: "frames: end after a pause", frames: post("5", data("hello", false), pause, data("", true))},
		{name: "frames: content-length over the DATA", frames: post("10", data("hello", true))},
		{name: "frames: content-length under the DATA", frames: post("3", data("hello", true))},
		// The general path answers as the handler (which sends no body
		// for a length of 0) and the reader (which resets the stream at
		// the DATA) race: only the path is checked.
		{name: "frames: content-length 0 and DATA", frames: post("0", data("hello", true)), racy: true},
		{name: "frames: content-length 0, empty DATA", frames: post("0", data("", true))},
		{name: "frames: no content-length", frames: post("", data("hello", true))},
		{name: "frames: content-length with a plus", frames: post("+5", data("hello", true))},
		{name: "frames: content-length with a leading zero", frames: post("05", data("hello", true))},
		{name: "frames: two content-lengths", frames: post("5", h2Step{kind: "field", fields: []string{"content-length", "5"}}, data("hello", true))},
		{name: "frames: content-length without a body", frames: []h2Step{{kind: "headers", end: true, fields: []string{strings.ToLower(HeaderAuth), tok, "content-length", "5"}}}},
		{name: "frames: trailers", frames: post("5", data("hello", false), h2Step{kind: "trailers", fields: []string{"x-t", "1"}})},
		{name: "frames: body, then RST_STREAM", frames: post("5", data("hello", false), pause, h2Step{kind: "rst"})},
		// Whether the reset comes before the handler looks at the body.
		// Whether the request reaches the guest before the reset ends it
		// is a matter of timing on either path (under -race the general
		// path lost the race once).
		{name: "frames: RST_STREAM after the body", frames: post("5", data("hello", true), h2Step{kind: "rst"}), either: true, racy: true},
		simple("plain", "GET", base+"/", http.Header{"User-Agent": {"t"}}, true),
		simple("query", "GET", base+"/a/b?x=1&y=%20z", nil, true),
		simple("escaped path", "GET", base+"/a%20b/c;d=1/%2F@:$+,", nil, true),
		simple("path net/url rewrites", "GET", base+"/a!b*(c)", nil, false),
		simple("HEAD", "HEAD", base+"/", http.Header{"X-Answer": {"head"}}, true),
		simple("DELETE", "DELETE", base+"/x", nil, true),
		simple("bodyless POST (content-length: 0)", "POST", base+"/x", nil, true),
		simple("bodyless PUT, answer sniff", "PUT", base+"/x", http.Header{"X-Answer": {"sniff"}}, true),
		simple("duplicate fields", "GET", base+"/", http.Header{"X-A": {"1", "2"}, "X-B": {"3"}}, true),
		simple("spaced values", "GET", base+"/", http.Header{"X-S": {"  s  "}, "X-T": {"\tt"}, "User-Agent": {""}}, true),
		simple("kiln fields", "GET", base+"/", http.Header{"X-Aws-Proxy-Port": {"8080"}, "X-Aws-Proxy-Other": {"1"}}, true),
		simple("planted forwarding", "GET", base+"/", http.Header{"X-Forwarded-For": {"203.0.113.9"}, "Forwarded": {"for=x"}, "X-Forwarded-Host": {"evil"}}, true),
		simple("E2B traffic token", "GET", base+"/", http.Header{"E2b-Traffic-Access-Token": {"secret"}}, true),
		simple("token cookie", "GET", base+"/", http.Header{"Cookie": {CookieAuth + "=" + tok}}, true),
		// The token in the cookie only (a browser's). Go's client sends
		// "a; b" as two cookie fields (RFC 9113 8.2.3), as browsers may.
		simple("cookie token alone", "GET", base+"/", noAuth("Cookie", CookieAuth+"="+tok), true),
		simple("cookie token among others", "GET", base+"/", noAuth("Cookie", "a=1; "+CookieAuth+"="+tok+"; b=2;c=3"), true),
		simple("cookie token in several fields", "GET", base+"/", noAuth("Cookie", "a=1", CookieAuth+"="+tok, "b=2"), true),
		simple("cookie token spaced name", "GET", base+"/", noAuth("Cookie", " a=1 ;  "+CookieAuth+" ="+tok+" "), true),
		simple("cookie token quoted", "GET", base+"/", noAuth("Cookie", CookieAuth+"=\""+tok+"\""), true),
		simple("cookie token empty", "GET", base+"/", noAuth("Cookie", CookieAuth+"=; "+CookieAuth+"="+tok), false),
		simple("two token cookies", "GET", base+"/", noAuth("Cookie", CookieAuth+"="+tok+"; "+CookieAuth+"=nope"), true),
		simple("two token cookies, bad first", "GET", base+"/", noAuth("Cookie", CookieAuth+"=nope", CookieAuth+"="+tok), false),
		simple("cookie token after invalid ones", "GET", base+"/", noAuth("Cookie", CookieAuth+"=a\\b; "+CookieAuth+"=\x80\"; "+CookieAuth+"="+tok), true),
		simple("cookie token, bad header token", "GET", base+"/", http.Header{HeaderAuth: {"nope"}, "Cookie": {CookieAuth + "=" + tok}}, false),
		simple("bad cookie token, header token", "GET", base+"/", http.Header{"Cookie": {"a=1; " + CookieAuth + "=nope"}}, true),
		simple("cookie token of another VM", "GET", "https://otheracct."+domain+"/", noAuth("Cookie", CookieAuth+"="+tok), false),
		simple("subprotocols", "GET", base+"/", http.Header{"Sec-Websocket-Protocol": {SubprotoAuth + tok + ", chat"}}, false),
		simple("gRPC type", "GET", base+"/", http.Header{"Content-Type": {"application/grpc"}}, false),
		simple("bad token", "GET", base+"/", http.Header{HeaderAuth: {"nope"}}, false),
		simple("token of another VM", "GET", "https://otheracct."+domain+"/", nil, false),
		simple("other account", "GET", "https://otheracct."+domain+"/", http.Header{HeaderAuth: {other}}, false),
		simple("shell port", "GET", base+"/", http.Header{"X-Aws-Proxy-Port": {"8022"}}, false),
		simple("query token link", "GET", base+"/?"+QueryAuth+"="+tok, http.Header{HeaderAuth: {""}}, false),
		simple("E2B host", "GET", "https://8080-vm1."+domain+"/", nil, false),
	}
	for name := range guestAnswers {
		if name != "head" {
			cases = append(cases, tc{name: "answer " + name, method: "GET", url: base + "/", hdr: http.Header{"X-Answer": {name}}, direct: true})
			cases = append(cases, tc{name: "body, answer " + name, method: "POST", url: base + "/", hdr: http.Header{"X-Answer": {name}}, body: "hello", direct: true})
		}
	}
	slices.SortStableFunc(cases, func(a, b tc) int { return strings.Compare(a.name, b.name) })
	do := func(c tc) string {
		if c.frames != nil {
			return h2Frames(t, e.ln.Addr().String(), c.frames)
		}
		var reqBody io.Reader
		if c.body != "" {
			reqBody = strings.NewReader(c.body)
			if c.noLen {
				reqBody = io.MultiReader(reqBody) // a length Go's client does not know
			}
		}
		req, _ := http.NewRequest(c.method, c.url, reqBody)
		if c.trailer {
			req.Trailer = http.Header{"X-T": {"1"}}
		}
		req.Header.Set(HeaderAuth, tok)
		for k, v := range c.hdr {
			req.Header[http.CanonicalHeaderKey(k)] = v // one field each, in an order Go's client picks
		}
		if v, ok := c.hdr[HeaderAuth]; ok && v[0] == "" {
			req.Header.Del(HeaderAuth)
		}
		resp, err := client.Do(req)
		if err != nil {
			return "error"
		}
		return describeAnswer(resp)
	}
	do(cases[0]) // speaksTLS probes the guest port once
	e.g.take()
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e.srv.closeIdle()
			e.srv.noDirect.Store(true)
			wantClient := do(c)
			wantGuest := e.g.take()
			e.srv.closeIdle()
			e.srv.noDirect.Store(false)
			taken.Store(0)
			gotClient := do(c)
			gotGuest := e.g.take()
			// A body that the handler finds incomplete after its wait
			// (h2DirectBodyWait, on a busy machine) takes the general
			// path; a body that comes with its HEADERS must be taken in
			// one of three tries.
			for try := 0; c.direct && taken.Load() == 0 && (c.body != "" || c.frames != nil) && try < 2; try++ {
				e.srv.closeIdle()
				gotClient, gotGuest = do(c), e.g.take()
			}
			if !c.either && c.direct != (taken.Load() > 0) {
				t.Errorf("the direct path took it: %v, want %v", taken.Load() > 0, c.direct)
			}
			if c.racy {
				return
			}
			if c.name == "body, answer chunkedbad" {
				// As on HTTP/1.1 (TestDirectSameAsGeneral's broken):
				// ReverseProxy, the general path of a body, sends a
				// stream's head at once, the direct path's answerH1 with
				// its first bytes; the client gets the head or an error,
				// never a whole answer.
				for _, answer := range []string{gotClient, wantClient} {
					if answer != "error" && !strings.HasSuffix(answer, "err true") {
						t.Errorf("the client got a whole answer:\n%s", answer)
					}
				}
			} else if gotClient != wantClient {
				t.Errorf("the client got\n%s\n\nthe general path answers\n%s", gotClient, wantClient)
			}
			if len(gotGuest) != len(wantGuest) {
				t.Fatalf("the guest got %d requests, from the general path %d:\n%q\n%q", len(gotGuest), len(wantGuest), gotGuest, wantGuest)
			}
			for i := range gotGuest {
				head, body, _ := strings.Cut(gotGuest[i], "\r\n\r\n")
				whead, wbody, _ := strings.Cut(wantGuest[i], "\r\n\r\n")
				if got, want := normalizeHead(head), normalizeHead(whead); got != want || body != wbody {
					t.Errorf("the guest got\n%s\n%q\n\nfrom the general path\n%s\n%q", got, body, want, wbody)
				}
			}
		})
	}
}

// h2Step is one step of a hand-driven h2 stream (h2Frames): "headers"
// (its fields after the pseudo-headers of a POST; a zero h2Step after it
// adds two user-agents, a "field" step more fields), "data" or "padded"
// (DATA, with 7 bytes of padding), "trailers", "rst" (RST_STREAM
// CANCEL), "pause" (what was written leaves, then 30 ms pass: longer
// than the direct path waits for a body).
type h2Step struct {
	kind   string
	fields []string
	data   string
	end    bool
}

// h2Frames sends one stream (id 1) as steps say on a new connection,
// frames buffered until a pause or the end so that they arrive in one
// read, and describes what the client gets: the answer's status, fields
// but Date, body and how the stream ended, then the status of a plain
// GET sent after it on the same connection.
func h2Frames(t *testing.T, addr string, steps []h2Step) string {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, ServerName: "vm1." + domain})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	bw := bufio.NewWriter(c)
	fr := http2.NewFramer(bw, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	block := func(fields ...string) []byte {
		hbuf.Reset()
		for i := 0; i < len(fields); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return hbuf.Bytes()
	}
	io.WriteString(bw, http2.ClientPreface)
	fr.WriteSettings()
	reset := false
	for i := 0; i < len(steps); i++ {
		st := steps[i]
		switch st.kind {
		case "headers":
			fields := append([]string{":method", "POST", ":scheme", "https", ":authority", "vm1." + domain, ":path", "/x"}, st.fields...)
			for ; i+1 < len(steps) && (steps[i+1].kind == "" || steps[i+1].kind == "field"); i++ {
				if steps[i+1].kind == "" {
					fields = append(fields, "user-agent", "a", "user-agent", "b")
				}
				fields = append(fields, steps[i+1].fields...)
			}
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(fields...), EndStream: st.end, EndHeaders: true})
		case "data":
			fr.WriteData(1, st.end, []byte(st.data))
		case "padded":
			fr.WriteDataPadded(1, st.end, []byte(st.data), make([]byte, 7))
		case "trailers":
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(st.fields...), EndStream: true, EndHeaders: true})
		case "rst":
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
			reset = true
		case "pause":
			bw.Flush()
			time.Sleep(30 * time.Millisecond)
		}
	}
	bw.Flush()
	var out strings.Builder
	var body []byte
	if reset {
		// Nothing of the stream is awaited: a PING's answer marks the end
		// of what came meanwhile.
		time.Sleep(30 * time.Millisecond)
		fr.WritePing(false, [8]byte{1})
		bw.Flush()
	}
	pinged := reset
	rstCode := ""
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			fmt.Fprintf(&out, "connection ended: %v\n", err)
			return out.String()
		}
		ended := false
		switch f := f.(type) {
		case *http2.PingFrame:
			if f.IsAck() {
				goto done
			}
		case *http2.GoAwayFrame:
			fmt.Fprintf(&out, "GOAWAY %v\n", f.ErrCode)
			return out.String()
		case *http2.MetaHeadersFrame:
			if f.StreamID != 1 {
				continue
			}
			var fields []string
			for _, hf := range f.RegularFields() {
				if hf.Name != "date" {
					fields = append(fields, hf.Name+": "+hf.Value)
				}
			}
			slices.Sort(fields)
			fmt.Fprintf(&out, "%s\n%s\n", f.PseudoValue("status"), strings.Join(fields, "\n"))
			ended = f.StreamEnded()
		case *http2.DataFrame:
			if f.StreamID != 1 {
				continue
			}
			body = append(body, f.Data()...)
			ended = f.StreamEnded()
		case *http2.RSTStreamFrame:
			// NO_ERROR after the answer's end only says that the rest of
			// the body is not wanted (RFC 9113 8.1).
			if f.StreamID == 1 && (f.ErrCode != http2.ErrCodeNo || !pinged) {
				rstCode, ended = f.ErrCode.String(), true
			}
		}
		if ended && !pinged {
			// What else comes for the stream (a reset after its end)
			// comes before the PING's answer.
			fr.WritePing(false, [8]byte{2})
			bw.Flush()
			pinged = true
		}
	}
done:
	if reset || rstCode != "" {
		// Frames around a reset stream's end race with the reset (the
		// general path's writer may answer a stream the reader is
		// resetting), and a client drops them: the reset is the answer.
		out.Reset()
		fmt.Fprintf(&out, "reset by the client %v, RST_STREAM %s\n", reset, rstCode)
	} else {
		fmt.Fprintf(&out, "body %q\n", body)
	}
	// The connection serves on (its windows included).
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndStream: true, EndHeaders: true,
		BlockFragment: block(":method", "GET", ":scheme", "https", ":authority", "vm1."+domain, ":path", "/next", "x-aws-proxy-auth", "nope")})
	bw.Flush()
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			fmt.Fprintf(&out, "no next answer: %v", err)
			break
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 3 {
			fmt.Fprintf(&out, "next %s", h.PseudoValue("status"))
			break
		}
	}
	return out.String()
}

// FuzzH2DirectHead: a header block h2DirectHead takes, newRequest takes
// too, and the guest gets from the direct path what the general path
// writes (outgoing, writeHead; with a body, Request.Write), field order
// aside. The block is lines of "name: value" (pseudo-headers as
// ":method: GET"); an empty line and what follows make the stream's
// body, which the headers then do not end.
func FuzzH2DirectHead(f *testing.F) {
	f.Add(":method: GET\n:scheme: https\n:authority: vm1." + domain + "\n:path: /a?b=1\nx-aws-proxy-auth: t\nuser-agent: \ncookie: a=1; " + CookieAuth + "=t\nx-s:  s \t")
	f.Add(":method: GET\n:scheme: https\n:authority: vm1\n:path: /%2F\nx-forwarded-for: 1\nproxy-authorization: x\ne2b-traffic-access-token: y\nx-a: 1\nx-a: 2")
	f.Add(":method: POST\n:scheme: https\n:authority: h:443\n:path: /;x\ncontent-type: application/grpc")
	f.Add(":method: GET\n:scheme: https\n:path: /\n:authority: h\n:authority: i")
	f.Add(":method: POST\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 0\nx-aws-proxy-auth: t")
	f.Add(":method: GET\n:scheme: https\n:authority: vm1\n:path: /\ncontent-length: 0\ncontent-length: 0")
	f.Add(":method: GET\n:scheme: https\n:authority: vm1\n:path: /\ncookie: a=1\nx-a: 1\ncookie:  " + CookieAuth + "=\"t\" \ncookie: \ncookie: " + CookieAuth + "=u;b")
	f.Add(":method: POST\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 5\nx-aws-proxy-auth: t\ncontent-type: application/json\n\nhello")
	f.Add(":method: PUT\n:scheme: https\n:authority: vm1:443\n:path: /p\nuser-agent: a\nuser-agent: b\ncookie: a=1\ncookie: b=2\ncontent-length: 2\n\n{}")
	f.Add(":method: POST\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 5\ncontent-length: 5\n\nhello")
	f.Add(":method: POST\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 0\n\n")
	f.Add(":method: POST\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 2049\n\nx")
	f.Add(":method: GET\n:scheme: https\n:authority: vm1\n:path: /p\ncontent-length: 3\n\nabc")
	f.Fuzz(func(t *testing.T, block string) {
		block, body, hasBody := strings.Cut(block, "\n\n")
		var fields []hpack.HeaderField
		for line := range strings.SplitSeq(block, "\n") {
			name, value, _ := strings.Cut(line[min(1, len(line)):], ": ")
			fields = append(fields, hpack.HeaderField{Name: line[:min(1, len(line))] + name, Value: value})
		}
		d := h2DirectHead(fields, true, !hasBody)
		if d == nil {
			return
		}
		c := &h2Conn{remote: "192.0.2.7:4000", state: &tls.ConnectionState{}}
		r, declared, err := c.newRequest(fields, !hasBody)
		if err != nil {
			t.Fatalf("h2DirectHead took %q, newRequest refused it: %v", block, err)
		}
		if hasBody != d.hasCL || hasBody && (declared != int64(d.cl) || d.cl <= 0 || d.cl > maxDirectBody) {
			t.Fatalf("%q: a body %v of %d bytes for the direct path, %d declared for the general one", block, d.hasCL, d.cl, declared)
		}
		if r.URL.RequestURI() != d.uri {
			t.Fatalf("%q: the direct path sends %q, the general one %q", block, d.uri, r.URL.RequestURI())
		}
		if _, ok := r.Header[fieldWSProtocol]; ok {
			return // not for the direct path (directRoute)
		}
		sameCookieToken(t, block, r, d)
		d.remoteIP = "192.0.2.7"
		if !hasBody {
			sameGuestHead(t, block, r, d)
		} else if len(body) == d.cl { // put lets no other length through
			d.body = []byte(body)
			sameBodyGuest(t, block, r, d)
		}
	})
}

// lookupCounter counts a running backend's Lookups.
type lookupCounter struct {
	runningBackend
	n atomic.Int32
}

func (b *lookupCounter) Lookup(ctx context.Context, id string) (Target, error) {
	b.n.Add(1)
	return b.runningBackend.Lookup(ctx, id)
}

// TestDirectBodyPooledConn: a request with a body on a kept guest
// connection fares as on the general path (http.Transport's pool): one
// the guest closed while idle is not used, and one that breaks off after
// the request was sent is not sent the body again.
func TestDirectBodyPooledConn(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, err := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	req := func(method, answer, body string) string {
		r := method + " /x HTTP/1.1\r\nHost: vm1." + domain + "\r\nX-Aws-Proxy-Auth: " + tok + "\r\nX-Answer: " + answer + "\r\n"
		if body != "" {
			r += "Content-Length: " + strconv.Itoa(len(body)) + "\r\n"
		}
		return r + "\r\n" + body
	}
	addr := e.ln.Addr().String()
	roundTrip(t, addr, e.roots, req("GET", "plain", "")) // speaksTLS's probe, remembered
	e.g.take()
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	longBodyWait(t)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots}, ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}, Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	for _, seq := range []struct {
		name  string
		reqs  []string
		want  []string // each answer's status line
		conns int32    // the guest connections the direct path opens
	}{
		{"closed while idle", []string{req("POST", "idleclose", "a=1"), req("POST", "plain", "b=2")}, []string{"200 OK", "200 OK"}, 2},
		{"closed while idle, after a GET", []string{req("GET", "idleclose", ""), req("PUT", "plain", "b=2")}, []string{"200 OK", "200 OK"}, 2},
		// Not sent twice either (Transport's isReplayable): it too takes a
		// pooled connection only when it is seen open.
		{"closed while idle, a POST without a body", []string{req("GET", "idleclose", ""), req("POST", "plain", "")}, []string{"200 OK", "200 OK"}, 2},
		{"closed while idle, a DELETE", []string{req("GET", "idleclose", ""), req("DELETE", "plain", "")}, []string{"200 OK", "200 OK"}, 2},
		{"no answer to a DELETE on a kept one", []string{req("GET", "plain", ""), req("DELETE", "nothing", "")}, []string{"200 OK", "502 Bad Gateway"}, 1},
		{"kept", []string{req("POST", "plain", "a=1"), req("PATCH", "plain", "b=2"), req("GET", "plain", "")}, []string{"200 OK", "200 OK", "200 OK"}, 1},
		{"no answer on a kept one", []string{req("POST", "plain", "a=1"), req("POST", "nothing", "b=2")}, []string{"200 OK", "502 Bad Gateway"}, 1},
		// Transport sends a GET again only without a body (isReplayable).
		{"GET with a body, no answer on a kept one", []string{req("GET", "plain", "a=1"), req("GET", "nothing", "b=2")}, []string{"200 OK", "502 Bad Gateway"}, 1},
	} {
		for _, h2 := range []bool{false, true} {
			name := seq.name
			if h2 {
				name += ", h2"
			}
			t.Run(name, func(t *testing.T) {
				var runs [2][]string
				var guests [2][]string
				for i, general := range []bool{true, false} {
					e.srv.closeIdle()
					e.srv.noDirect.Store(general)
					taken.Store(0)
					e.g.conns.Store(0)
					closes := e.g.closed.Load()
					for _, r := range seq.reqs {
						if h2 {
							runs[i] = append(runs[i], h2RoundTrip(t, client, r))
						} else {
							runs[i] = append(runs[i], roundTrip(t, addr, e.roots, r))
						}
						_, answer, _ := strings.Cut(r, "X-Answer: ")
						answer, _, _ = strings.Cut(answer, "\r\n")
						switch {
						case general:
							// http.Transport's pool: it takes a connection
							// back, or drops one the guest closed, once its
							// reader has run; nothing to watch.
							time.Sleep(50 * time.Millisecond)
						case closingAnswers[answer]:
							// The guest's close has reached the proxy.
							closes++
							testenv.WaitFor(t, 5*time.Second, func() bool { return e.g.closed.Load() >= closes }, "the guest's close (answer "+answer+") to reach the proxy")
						default:
							// The client can have the answer before the
							// proxy put the connection back in its pool.
							testenv.WaitFor(t, 5*time.Second, func() bool { return e.srv.up.idleCount() > 0 }, "the guest connection to be back in the pool")
						}
					}
					guests[i] = e.g.take()
					if !general && int(taken.Load()) != len(seq.reqs) {
						t.Errorf("the direct path took %d of %d requests", taken.Load(), len(seq.reqs))
					}
					if n := e.g.conns.Load(); !general && n != seq.conns {
						t.Errorf("the direct path opened %d guest connections, want %d", n, seq.conns)
					}
				}
				e.srv.noDirect.Store(false)
				for j := range seq.reqs {
					if got, want := runs[1][j], runs[0][j]; got != want {
						t.Errorf("request %d: the client got\n%s\nthe general path answers\n%s", j, got, want)
					}
					if !strings.Contains(runs[1][j], seq.want[j]) {
						t.Errorf("request %d: %s, want %s", j, runs[1][j], seq.want[j])
					}
				}
				if len(guests[1]) != len(seq.reqs) || len(guests[0]) != len(seq.reqs) {
					t.Errorf("the guest got %d requests from the direct path, %d from the general one, want %d each (none sent twice)",
						len(guests[1]), len(guests[0]), len(seq.reqs))
				}
			})
		}
	}
}

// h2RoundTrip sends the HTTP/1.1 request raw as client sends it over h2
// and describes the answer as roundTrip does: its status line (and
// "[0]" for the one answer), fields but Date, and body.
func h2RoundTrip(t *testing.T, client *http.Client, raw string) string {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(r.Body)
	var rb io.Reader
	if len(body) > 0 {
		rb = bytes.NewReader(body)
	}
	req, _ := http.NewRequest(r.Method, "https://"+r.Host+r.RequestURI, rb)
	req.Header = r.Header
	resp, err := client.Do(req)
	if err != nil {
		return "[0] no answer: " + err.Error()
	}
	return "[0] " + describeAnswer(resp)
}

// describeAnswer reads resp and describes it: protocol, status, length,
// fields but Date (sorted), body and whether it broke off.
func describeAnswer(resp *http.Response) string {
	defer resp.Body.Close()
	body, berr := io.ReadAll(resp.Body)
	var fields []string
	for k, vv := range resp.Header {
		if k != "Date" {
			fields = append(fields, k+": "+strings.Join(vv, " | "))
		}
	}
	slices.Sort(fields)
	return fmt.Sprintf("%s %s cl=%d\n%s\nbody %q err %v", resp.Proto, resp.Status, resp.ContentLength,
		strings.Join(fields, "\n"), body, berr != nil)
}

// TestDirectLookupOnce: a guest port that speaks TLS takes the general
// path, and after the first request of a connection the direct path's
// check no longer asks Lookup a second time per request.
func TestDirectLookupOnce(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls app") }))
	t.Cleanup(app.Close)
	ca, roots, signer := testPKI(t)
	lo := netip.MustParseAddr("127.0.0.1")
	b := &lookupCounter{runningBackend: runningBackend{fakeBackend: &fakeBackend{ensures: map[string]int{}, open: map[string]int{},
		vms: map[string]*fakeVM{"vm1": {tgt: Target{Account: "acct", Addr: lo, Ingress: true}}}}}}
	_, ln := serveProxy(t, Config{Domain: domain, Backend: b, Tokens: signer,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, app.Listener.Addr().String())
		}}, ca)
	tok, _, _ := signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	for _, run := range []struct{ h2, cookie bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		h2 := run.h2
		tc := &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}}
		if h2 {
			tc.NextProtos = nil
		}
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: h2,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, ln.Addr().String())
			}}, Timeout: 5 * time.Second}
		b.n.Store(0)
		const n = 5
		for range n {
			req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
			if run.cookie { // a browser's: the direct path's check reads the cookie as far as Lookup
				req.Header.Set("Cookie", "a=1; "+CookieAuth+"="+tok)
			} else {
				req.Header.Set(HeaderAuth, tok)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "tls app" {
				t.Fatalf("%+v: %d %q", run, resp.StatusCode, body)
			}
		}
		// The first two requests are asked twice (the first's check finds
		// no TLS known yet and the general path probes; the second's check
		// learns it; once the server knows, only the first), then one
		// each; without the memo, two each. n: the check stepped aside
		// before Lookup (as it did for a cookie token).
		if got := b.n.Load(); got > n+2 || got <= n {
			t.Errorf("%+v: %d Lookups for %d requests on one connection", run, got, n)
		}
		client.CloseIdleConnections()
	}
}

// TestDirectH2Window: the direct writer sends a body the client's stream
// window does not hold at once as the windows allow: the header alone,
// then DATA as WINDOW_UPDATEs come.
func TestDirectH2Window(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, _ := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	r := dialH2(t, e.ln.Addr().String())
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 3})
	for _, id := range []uint32{1, 3} { // the first probes the guest port: the general path
		r.headers(id, true, ":method", "GET", ":scheme", "https", ":authority", "vm1."+domain, ":path", "/",
			strings.ToLower(HeaderAuth), tok)
		if got := r.status(id); got != "200" {
			t.Fatalf("stream %d: status %s", id, got)
		}
		var body []byte
		for {
			f := r.until("DATA", func(f http2.Frame) bool { return f.Header().StreamID == id })
			d, ok := f.(*http2.DataFrame)
			if !ok {
				t.Fatalf("stream %d: %v", id, f)
			}
			body = append(body, d.Data()...)
			if d.StreamEnded() {
				break
			}
			if len(d.Data()) > 3 {
				t.Fatalf("stream %d: DATA of %d bytes in a window of 3", id, len(d.Data()))
			}
			r.fr.WriteWindowUpdate(id, uint32(len(d.Data())))
		}
		if string(body) != "hello" {
			t.Fatalf("stream %d: body %q", id, body)
		}
	}
	if taken.Load() != 1 {
		t.Fatalf("the direct path took %d streams, want 1", taken.Load())
	}
}

// TestDirectH2BodyCredit: the direct path gives the window of the
// bodies it takes back as the general path's reads do: more small
// bodies on one connection than its window holds all go through (the
// client would wait for window otherwise).
func TestDirectH2BodyCredit(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, _ := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	var taken, dials atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	longBodyWait(t)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots}, ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, network, e.ln.Addr().String())
		}}, Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	body := strings.Repeat("c", maxDirectBody)
	n := h2ConnWindow/maxDirectBody + 100
	for i := range n {
		req, _ := http.NewRequest("POST", "https://vm1."+domain+"/x", strings.NewReader(body))
		req.Header.Set(HeaderAuth, tok)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("request %d: %s %s", i, resp.Proto, resp.Status)
		}
	}
	if got := len(e.g.take()); got != n {
		t.Fatalf("the guest got %d requests, want %d", got, n)
	}
	// More than the connection's window went the direct path (nearly
	// all: the first probes the guest port, and a body that the handler
	// finds incomplete after its wait, longBodyWait's here, goes the
	// general path).
	if int(taken.Load())*maxDirectBody <= h2ConnWindow || dials.Load() != 1 {
		t.Fatalf("the direct path took %d of %d requests on %d connections, want more than %d on 1", taken.Load(), n, dials.Load(), h2ConnWindow/maxDirectBody)
	}
}

// TestDirectSuspendBetweenChecks: a VM that directRoute saw running but
// that stopped before the request was sent (a suspend that began in
// between) is woken, and the client gets the guest's answer once, with
// the connection fit for the next request, on HTTP/1.1 and h2.
func TestDirectSuspendBetweenChecks(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, _ := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	for _, h2 := range []bool{false, true} {
		tc := &tls.Config{RootCAs: e.roots, NextProtos: []string{"http/1.1"}}
		if h2 {
			tc.NextProtos = nil
		}
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: h2,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, e.ln.Addr().String())
			}}, Timeout: 5 * time.Second}
		// HTTP/1.1 by hand: Go's client would take a stray second answer
		// for an unsolicited one and quietly dial anew.
		var conn *tls.Conn
		var br *bufio.Reader
		if !h2 {
			c, err := tls.Dial("tcp", e.ln.Addr().String(), &tls.Config{RootCAs: e.roots, ServerName: "vm1." + domain, NextProtos: []string{"http/1.1"}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			conn, br = c, bufio.NewReader(c)
		}
		get := func() string {
			req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
			req.Header.Set(HeaderAuth, tok)
			var resp *http.Response
			var err error
			if h2 {
				resp, err = client.Do(req)
			} else if err = req.Write(conn); err == nil {
				resp, err = http.ReadResponse(br, req)
			}
			if err != nil {
				t.Fatalf("h2=%v: %v", h2, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			return fmt.Sprintf("%s %d %q %v", resp.Proto, resp.StatusCode, body, err)
		}
		get() // probes the guest port for TLS: the general path
		ensures, _ := e.fb.counts("vm1")
		taken.Store(0)
		// directRoute's check says running; forwardDirect's and wake's
		// say stopped, and wake asks EnsureRunning.
		e.next <- true
		e.next <- false
		e.next <- false
		first := get()
		if taken.Load() != 1 {
			t.Fatalf("h2=%v: the direct path took %d requests, want 1", h2, taken.Load())
		}
		if got, _ := e.fb.counts("vm1"); got != ensures+1 {
			t.Errorf("h2=%v: EnsureRunning asked %d times, want 1", h2, got-ensures)
		}
		for i, got := range []string{first, get(), get()} {
			if !strings.HasSuffix(got, ` 200 "hello" <nil>`) {
				t.Errorf("h2=%v: answer %d: %s", h2, i, got)
			}
		}
		client.CloseIdleConnections()
		e.g.take()
	}
}

// TestStrayBytesNotTakenForAnswer: a guest that sends more than its
// answer (a body to HEAD, bytes past its Content-Length) in the same
// write does not spoil the next request on its pooled connection: the
// proxy does not reuse a connection with bytes left over, on either path.
func TestStrayBytesNotTakenForAnswer(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, _ := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	auth := "X-Aws-Proxy-Auth: " + tok + "\r\n"
	roundTrip(t, e.ln.Addr().String(), e.roots, "GET / HTTP/1.1\r\nHost: vm1."+domain+"\r\n"+auth+"\r\n") // the TLS probe
	for _, general := range []bool{false, true} {
		e.srv.noDirect.Store(general)
		for _, c := range []struct{ method, answer string }{{"HEAD", "plain"}, {"GET", "overlong"}, {"HEAD", "headlate"}, {"GET", "unsolicited"}} {
			first := c.method + " / HTTP/1.1\r\nHost: vm1." + domain + "\r\n" + auth + "X-Answer: " + c.answer + "\r\n\r\n"
			e.srv.closeIdle()
			n := e.g.lateIn.Load()
			roundTrip(t, e.ln.Addr().String(), e.roots, first)
			// The late part, if the answer has one, is in kiln's socket.
			if strings.Contains(guestAnswers[c.answer], splitWrite) {
				testenv.WaitFor(t, 5*time.Second, func() bool { return e.g.lateIn.Load() > n }, "the late part of "+c.answer+" to reach the proxy's socket")
			}
			got := roundTrip(t, e.ln.Addr().String(), e.roots, "GET / HTTP/1.1\r\nHost: vm1."+domain+"\r\n"+auth+"\r\n")
			if !strings.HasPrefix(got, "[0] HTTP/1.1 200 OK\n") || !strings.Contains(got, `body "hello" err <nil>`) {
				t.Errorf("general=%v, after %s answered %q the next request got\n%s", general, c.method, c.answer, got)
			}
		}
	}
	e.srv.noDirect.Store(false)
}

// TestDirectSlowBodyNotHeld: on h2, what has come of a body goes on to
// the client as on the general path, not once a whole 8 KiB chunk has:
// the client sees the body's first 9100 bytes while the guest holds the
// rest back.
func TestDirectSlowBodyNotHeld(t *testing.T) {
	e := newDirectEnv(t)
	tok, _, _ := e.signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: e.roots}, ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, e.ln.Addr().String())
		}}}
	defer client.CloseIdleConnections()
	roundTrip(t, e.ln.Addr().String(), e.roots, "GET / HTTP/1.1\r\nHost: vm1."+domain+"\r\nX-Aws-Proxy-Auth: "+tok+"\r\n\r\n") // speaksTLS's probe, remembered
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	for _, general := range []bool{false, true} {
		e.srv.noDirect.Store(general)
		taken.Store(0)
		req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
		req.Header.Set(HeaderAuth, tok)
		req.Header.Set("X-Answer", "slowbody")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan int, 1)
		go func() {
			b := make([]byte, 9100)
			n, _ := io.ReadFull(resp.Body, b)
			got <- n
		}()
		select {
		case n := <-got:
			if n != 9100 {
				t.Errorf("general=%v: %d bytes, want 9100", general, n)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("general=%v: the body's first 9100 bytes did not come while the guest held the rest", general)
		}
		e.g.gate <- struct{}{}
		rest, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || len(rest) != 10900 {
			t.Errorf("general=%v: the rest: %d bytes, %v", general, len(rest), err)
		}
		if !general && taken.Load() != 1 {
			t.Errorf("the direct path took %d requests, want 1", taken.Load())
		}
	}
	e.srv.noDirect.Store(false)
}

// TestDirectMemoPerPort: a connection's memo of a target that takes the
// general path (here a TLS app on port 8443) is kept per port, so a plain
// port of the same host on the same connection still takes the direct
// path. It was kept per host.
func TestDirectMemoPerPort(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls app") }))
	t.Cleanup(app.Close)
	g := startScriptedGuest(t)
	ca, roots, signer := testPKI(t)
	lo := netip.MustParseAddr("127.0.0.1")
	b := runningBackend{fakeBackend: &fakeBackend{ensures: map[string]int{}, open: map[string]int{},
		vms: map[string]*fakeVM{"vm1": {tgt: Target{Account: "acct", Addr: lo, Ingress: true}}}}}
	_, ln := serveProxy(t, Config{Domain: domain, Backend: b, Tokens: signer,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			to := g.addr
			if strings.HasSuffix(addr, ":8443") {
				to = app.Listener.Addr().String()
			}
			var d net.Dialer
			return d.DialContext(ctx, network, to)
		}}, ca)
	tok, _, _ := signer.Mint("acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	var taken atomic.Int32
	directTaken = func() { taken.Add(1) }
	t.Cleanup(func() { directTaken = nil })
	for _, h2 := range []bool{false, true} {
		tc := &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}}
		if h2 {
			tc.NextProtos = nil
		}
		var dials atomic.Int32
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: h2, MaxConnsPerHost: 1,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				dials.Add(1)
				var d net.Dialer
				return d.DialContext(ctx, network, ln.Addr().String())
			}}, Timeout: 5 * time.Second}
		get := func(port string) string {
			req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
			req.Header.Set(HeaderAuth, tok)
			req.Header.Set(HeaderPort, port)
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return string(body)
		}
		// Each port's kind is learnt first (the general path probes it);
		// the second request to the TLS port makes the memo.
		for _, port := range []string{"8080", "8443", "8443"} {
			get(port)
		}
		taken.Store(0)
		if got := get("8080"); got != "hello" || taken.Load() != 1 {
			t.Errorf("h2=%v: port 8080 after the TLS port answered %q, direct path taken %d times, want 1", h2, got, taken.Load())
		}
		if got := get("8443"); got != "tls app" {
			t.Errorf("h2=%v: port 8443 answered %q", h2, got)
		}
		if dials.Load() != 1 {
			t.Errorf("h2=%v: %d connections, want one", h2, dials.Load())
		}
		client.CloseIdleConnections()
	}
}
