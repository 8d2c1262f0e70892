package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// startLoop serves h on the own loop over plain TCP (the TLS layer under
// it is crypto/tls's); what the loop hands over goes to net/http's
// server with the same handler, which marks its answers.
func startLoop(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{log: slog.New(slog.DiscardHandler)}
	hs := &h1Serve{s: s, handler: h, fallback: newConnListener(ln.Addr()), conns: map[net.Conn]*h1Conn{}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Served-By", "net/http")
		h.ServeHTTP(w, r)
	}), ConnContext: connContext}
	go srv.Serve(hs.fallback)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			hc := &h1Conn{hs: hs, conn: c, raw: c, remote: c.RemoteAddr().String()}
			go hc.serve()
		}
	}()
	t.Cleanup(func() { ln.Close(); srv.Close() })
	return ln.Addr().String()
}

// loopHandler: /echo answers the body's length and SHA-256, /big writes
// n bytes (?n=, with ?cl=1 a Content-Length), /wait waits for the
// client to leave, /trailer sends a trailer, anything else "ok".
func loopHandler(left chan<- struct{}) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		fmt.Fprintf(w, "%d %s", n, hex.EncodeToString(h.Sum(nil)))
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		if r.URL.Query().Get("cl") != "" {
			w.Header().Set("Content-Length", strconv.Itoa(n))
		}
		w.Write(bytes.Repeat([]byte("x"), n))
	})
	mux.HandleFunc("/wait", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			left <- struct{}{}
		case <-time.After(10 * time.Second):
		}
	})
	mux.HandleFunc("/sleep", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(4 * watchDelay)
		io.WriteString(w, "slept")
	})
	mux.HandleFunc("/trailer", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		io.WriteString(w, "body")
		w.Header().Set("X-Sum", "42")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "ok "+r.Method+" "+r.URL.Path)
	})
	return mux
}

func dialLoop(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return resp, string(b)
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return fmt.Sprintf("%d %s", len(b), hex.EncodeToString(h[:]))
}

// TestLoopPipelining: requests sent back to back in one write are
// TestLoopWriteDeadlineEndsWithRequest: a write deadline a handler sets
// (envd bounds each stream message) ends with its answer, as with
// net/http: it used to stay on the connection and cut a later request's
// answer on it.
func TestLoopWriteDeadlineEndsWithRequest(t *testing.T) {
	addr := startLoop(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/deadline" {
			http.NewResponseController(w).SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		}
		io.WriteString(w, "ok")
	}))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i, path := range []string{"/deadline", "/after"} {
		if i > 0 {
			time.Sleep(300 * time.Millisecond) // past the first request's deadline
		}
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "ok" || resp.Header.Get("X-Served-By") != "" {
			t.Fatalf("%s: %q, served by %q", path, b, resp.Header.Get("X-Served-By"))
		}
	}
}

// answered in order on the one connection, bodies in between included.
func TestLoopPipelining(t *testing.T) {
	addr := startLoop(t, loopHandler(nil))
	c, br := dialLoop(t, addr)
	io.WriteString(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"+
		"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"+
		"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n"+
		"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, b := readResp(t, br, "GET"); b != "ok GET /a" {
		t.Errorf("first: %q", b)
	}
	if _, b := readResp(t, br, "POST"); b != sum([]byte("hello")) {
		t.Errorf("second: %q", b)
	}
	if resp, b := readResp(t, br, "HEAD"); b != "" || resp.StatusCode != 200 {
		t.Errorf("HEAD: %d %q", resp.StatusCode, b)
	}
	resp, b := readResp(t, br, "GET")
	if b != "ok GET /d" || resp.Header.Get("X-Served-By") != "" {
		t.Errorf("fourth: %q served by %q", b, resp.Header.Get("X-Served-By"))
	}
}

// TestLoopBodies: chunked and sized bodies far bigger than every buffer
// arrive whole, the connection serves on; a body the handler leaves
// unread is drained when small and ends the connection when large.
func TestLoopBodies(t *testing.T) {
	addr := startLoop(t, loopHandler(nil))
	c, br := dialLoop(t, addr)
	big := bytes.Repeat([]byte("0123456789abcdef"), 20000) // 320 KB
	var req bytes.Buffer
	req.WriteString("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
	for rest := big; len(rest) > 0; {
		n := min(len(rest), 7777)
		fmt.Fprintf(&req, "%x\r\n%s\r\n", n, rest[:n])
		rest = rest[n:]
	}
	req.WriteString("0\r\n\r\n")
	go c.Write(req.Bytes())
	if _, b := readResp(t, br, "POST"); b != sum(big) {
		t.Errorf("chunked: %q, want %q", b, sum(big))
	}
	go fmt.Fprintf(c, "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
	if _, b := readResp(t, br, "PUT"); b != sum(big) {
		t.Errorf("sized: %q", b)
	}
	// Unread, small: drained, the next request is read as one.
	fmt.Fprintf(c, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n%s", bytes.Repeat([]byte("y"), 1000))
	if resp, b := readResp(t, br, "POST"); b != "ok POST /x" || resp.Close {
		t.Errorf("unread small body: %q close=%v", b, resp.Close)
	}
	io.WriteString(c, "GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, b := readResp(t, br, "GET"); b != "ok GET /after" {
		t.Errorf("after a drained body: %q", b)
	}
	// Unread, large: the connection ends after the answer.
	go fmt.Fprintf(c, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s%s", 2*len(big), big, big)
	readResp(t, br, "POST")
	if _, err := br.ReadByte(); err == nil {
		t.Error("the connection stayed open after a large unread body")
	}
	// A client that waits for the answer before sending the rest of a
	// large body gets it at once, saying the connection closes.
	c2, br2 := dialLoop(t, addr)
	io.WriteString(c2, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\nabc")
	if resp, b := readResp(t, br2, "POST"); b != "ok POST /x" || !resp.Close {
		t.Errorf("large body, unread, client waiting: %q close=%v", b, resp.Close)
	}
}

// TestLoopResponses: small answers get a Content-Length, large ones of
// unknown length are chunked, declared lengths are kept, trailers reach
// the client, and Connection: close ends the connection.
func TestLoopResponses(t *testing.T) {
	addr := startLoop(t, loopHandler(nil))
	c, br := dialLoop(t, addr)
	io.WriteString(c, "GET /big?n=100 HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, b := readResp(t, br, "GET"); resp.ContentLength != 100 || len(b) != 100 || resp.Header.Get("Date") == "" {
		t.Errorf("small: length %d, %d bytes, Date %q", resp.ContentLength, len(b), resp.Header.Get("Date"))
	}
	io.WriteString(c, "GET /big?n=200000 HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, b := readResp(t, br, "GET"); len(resp.TransferEncoding) != 1 || len(b) != 200000 {
		t.Errorf("large: %v, %d bytes", resp.TransferEncoding, len(b))
	}
	io.WriteString(c, "GET /big?n=200000&cl=1 HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, b := readResp(t, br, "GET"); resp.ContentLength != 200000 || len(b) != 200000 {
		t.Errorf("large, sized: %d, %d bytes", resp.ContentLength, len(b))
	}
	io.WriteString(c, "GET /trailer HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, b := readResp(t, br, "GET"); b != "body" || resp.Trailer.Get("X-Sum") != "42" {
		t.Errorf("trailer: %q %v", b, resp.Trailer)
	}
	io.WriteString(c, "GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	if resp, b := readResp(t, br, "GET"); b != "ok GET /last" || !resp.Close {
		t.Errorf("Connection: close: %q close=%v", b, resp.Close)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after Connection: close: %v, want EOF", err)
	}
}

// TestLoopRefuses: what could be read two ways, or is too large, is
// refused with the connection closed; nothing reaches the handler.
func TestLoopRefuses(t *testing.T) {
	var reached atomic.Int32
	addr := startLoop(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached.Add(1) }))
	for _, tc := range []struct{ name, req string }{
		{"length and chunked", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"chunked and length", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length : 3\r\n\r\n0\r\n\r\n"},
		{"two lengths", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"},
		{"other coding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"},
		{"no host", "GET / HTTP/1.1\r\n\r\n"},
		{"two hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"},
		{"bad host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n"},
		{"bad header name", "GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n"},
		{"huge header", "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + strings.Repeat("a", 80<<10) + "\r\n\r\n"},
		{"bad chunk", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, br := dialLoop(t, addr)
			go io.WriteString(c, tc.req)
			resp, err := http.ReadResponse(br, nil)
			if tc.name == "bad chunk" {
				// The header was fine: the handler ran and read a bad body,
				// and the connection cannot serve on.
				if err == nil {
					io.Copy(io.Discard, resp.Body)
				}
				if _, err := br.ReadByte(); err == nil {
					t.Error("connection open after a malformed chunk")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode/100 != 4 || !resp.Close {
				t.Errorf("status %d close=%v, want 4xx and close", resp.StatusCode, resp.Close)
			}
		})
	}
	if n := reached.Load(); n != 1 {
		t.Errorf("%d requests reached the handler, want only the one with a bad chunk", n)
	}
}

// TestLoopClientLeaves: a client that leaves while its request waits
// ends the request's context.
func TestLoopClientLeaves(t *testing.T) {
	left := make(chan struct{}, 1)
	addr := startLoop(t, loopHandler(left))
	c, _ := dialLoop(t, addr)
	io.WriteString(c, "GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
	time.Sleep(2 * watchDelay)
	c.Close()
	select {
	case <-left:
	case <-time.After(5 * time.Second):
		t.Fatal("the request's context did not end when its client left")
	}
}

// TestLoopWatchKeepsBytes: a request sent while the previous one is
// watched (running past watchDelay) is read whole: the byte the watch
// took comes first.
func TestLoopWatchKeepsBytes(t *testing.T) {
	addr := startLoop(t, loopHandler(nil))
	c, br := dialLoop(t, addr)
	io.WriteString(c, "GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n")
	time.Sleep(2 * watchDelay)
	io.WriteString(c, "GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, b := readResp(t, br, "GET"); b != "slept" {
		t.Errorf("watched request: %q", b)
	}
	if _, b := readResp(t, br, "GET"); b != "ok GET /next" {
		t.Errorf("request sent during the watch: %q", b)
	}
}

// TestLoopHandsOver: HTTP/1.0, Expect and upgrades go to net/http with
// what the loop had read, pipelined requests after them included.
func TestLoopHandsOver(t *testing.T) {
	addr := startLoop(t, loopHandler(nil))
	c, br := dialLoop(t, addr)
	io.WriteString(c, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n"+
		"GET /two HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"+
		"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
	for i, want := range []struct{ body, by string }{{"ok GET /one", ""}, {"ok GET /two", "net/http"}, {"ok GET /three", "net/http"}} {
		resp, b := readResp(t, br, "GET")
		if b != want.body || resp.Header.Get("X-Served-By") != want.by {
			t.Errorf("answer %d: %q by %q, want %q by %q", i, b, resp.Header.Get("X-Served-By"), want.body, want.by)
		}
	}
	c2, br2 := dialLoop(t, addr)
	io.WriteString(c2, "POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
	if resp, err := http.ReadResponse(br2, nil); err != nil || resp.StatusCode != 100 {
		t.Fatalf("Expect: %v %v", resp, err)
	}
	io.WriteString(c2, "abc")
	if resp, b := readResp(t, br2, "POST"); b != sum([]byte("abc")) || resp.Header.Get("X-Served-By") != "net/http" {
		t.Errorf("after 100 Continue: %q", b)
	}
}

// TestLoopThroughProxy: on the endpoint, one client connection carries
// many requests, to the guest's kept-alive connection, with bodies in
// both directions, a guest that is not there (502, the connection
// serves on) and a guest that breaks off mid-answer (the client's
// connection ends, so a truncated body is never taken for whole).
func TestLoopThroughProxy(t *testing.T) {
	var guestConns atomic.Int32
	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gsrv := &http.Server{Handler: loopHandler(nil), ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			guestConns.Add(1)
		}
	}}
	go gsrv.Serve(gln)
	t.Cleanup(func() { gsrv.Close() })
	breaker, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
	})
	e := newEnvGuests(t, map[string]string{"7010": gln.Addr().String(), "7011": breaker})
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	tc, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: e.roots, ServerName: "vm1." + domain, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(tc)
	head := func(method, path, port, extra string) string {
		return method + " " + path + " HTTP/1.1\r\nHost: vm1." + domain + "\r\n" + HeaderAuth + ": " + tok + "\r\n" + HeaderPort + ": " + port + "\r\n" + extra + "\r\n"
	}
	io.WriteString(tc, head("GET", "/warm", "7010", "")) // probes the port for TLS
	readResp(t, br, "GET")
	guestConns.Store(0)
	for i := range 10 {
		io.WriteString(tc, head("GET", "/n"+strconv.Itoa(i), "7010", ""))
		if _, b := readResp(t, br, "GET"); b != "ok GET /n"+strconv.Itoa(i) {
			t.Fatalf("request %d: %q", i, b)
		}
	}
	if n := guestConns.Load(); n != 0 {
		t.Errorf("10 requests on one client connection opened %d guest connections, want none", n)
	}
	big := bytes.Repeat([]byte("z"), 300<<10)
	var req bytes.Buffer
	req.WriteString(head("POST", "/echo", "7010", "Transfer-Encoding: chunked\r\n"))
	fmt.Fprintf(&req, "%x\r\n%s\r\n0\r\n\r\n", len(big), big)
	go tc.Write(req.Bytes())
	if _, b := readResp(t, br, "POST"); b != sum(big) {
		t.Errorf("chunked upload through the proxy: %q", b)
	}
	io.WriteString(tc, head("GET", "/big?n=500000", "7010", ""))
	if _, b := readResp(t, br, "GET"); len(b) != 500000 {
		t.Errorf("large answer: %d bytes", len(b))
	}
	io.WriteString(tc, head("GET", "/", "7999", ""))
	if resp, _ := readResp(t, br, "GET"); resp.StatusCode != http.StatusBadGateway || resp.Close {
		t.Errorf("no guest listening: %d close=%v, want 502 on a kept connection", resp.StatusCode, resp.Close)
	}
	io.WriteString(tc, head("GET", "/", "7011", ""))
	resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	if err == nil {
		_, err = io.ReadAll(resp.Body)
	}
	if err == nil {
		t.Error("a body the guest broke off reached the client as whole")
	}
	waitClosed(t, e, "vm1")
}

// TestLoopShutdown: Serve's shutdown lets a request in flight finish
// (its answer says Connection: close) and ends idle connections.
func TestLoopShutdown(t *testing.T) {
	release, entered := make(chan struct{}), make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		io.WriteString(w, "done")
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(selfSignedCert(t))
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{log: slog.New(slog.DiscardHandler)}
	hs := &h1Serve{s: s, handler: h, tlsConf: &tls.Config{Certificates: []tls.Certificate{cert}},
		fallback: newConnListener(ln.Addr()), conns: map[net.Conn]*h1Conn{}}
	go hs.accept(ln)
	dial := func() (*tls.Conn, *bufio.Reader) {
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	busy, bbr := dial()
	_, ibr := dial()
	io.WriteString(busy, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	select { // the request is in flight
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the request's handler did not begin")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() { hs.closing.Store(true); ln.Close(); hs.shutdown(ctx); close(stopped) }()
	if _, err := ibr.ReadByte(); err == nil || isTimeout(err) {
		t.Errorf("idle connection at shutdown: %v, want it closed", err)
	}
	close(release)
	if resp, b := readResp(t, bbr, "GET"); b != "done" || !resp.Close {
		t.Errorf("request in flight: %q close=%v", b, resp.Close)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown did not end")
	}
}

// pipeConn is a client connection that sends in and keeps what the loop
// answers.
type pipeConn struct {
	mu  sync.Mutex
	in  *bytes.Reader
	out bytes.Buffer
}

func (c *pipeConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.in.Read(p)
}

func (c *pipeConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}

func (c *pipeConn) Close() error                       { return nil }
func (c *pipeConn) LocalAddr() net.Addr                { return &net.TCPAddr{} }
func (c *pipeConn) RemoteAddr() net.Addr               { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1} }
func (c *pipeConn) SetDeadline(t time.Time) error      { return nil }
func (c *pipeConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *pipeConn) SetWriteDeadline(t time.Time) error { return nil }

// FuzzH1Loop: whatever a client sends, the loop neither panics nor
// hangs; a request reaches the handler only with one valid Host and one
// framing of its body; every answer parses, one per request served, and
// only a refusal (a 4xx that closes) or a hand-over to net/http follows.
func FuzzH1Loop(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.0\r\n\r\n"))
	f.Add([]byte("GET http://x/ HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		var methods []string
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			methods = append(methods, r.Method)
			if !validHost(r.Host) || len(r.Header["Host"]) > 0 {
				t.Errorf("request with Host %q and header %q", r.Host, r.Header["Host"])
			}
			if len(r.TransferEncoding) > 0 && (r.ContentLength != -1 || len(r.Header["Content-Length"]) > 0) {
				t.Errorf("chunked request with a length: %d %q", r.ContentLength, r.Header["Content-Length"])
			}
			n, _ := io.Copy(io.Discard, r.Body)
			if r.ContentLength >= 0 && n > r.ContentLength {
				t.Errorf("read %d body bytes of %d", n, r.ContentLength)
			}
			io.WriteString(w, r.Method)
		})
		s := &Server{log: slog.New(slog.DiscardHandler)}
		ln := newConnListener(&net.TCPAddr{})
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close() // net/http's part is not this target's
			}
		}()
		hs := &h1Serve{s: s, handler: h, fallback: ln, conns: map[net.Conn]*h1Conn{}}
		pc := &pipeConn{in: bytes.NewReader(in)}
		done := make(chan struct{})
		go func() { (&h1Conn{hs: hs, conn: pc, raw: pc, remote: "192.0.2.1:1"}).serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the loop did not end at the end of its input")
		}
		br := bufio.NewReader(bytes.NewReader(pc.out.Bytes()))
		for i := 0; ; i++ {
			if _, err := br.Peek(1); err == io.EOF {
				if i < len(methods) {
					t.Fatalf("%d answers for %d requests", i, len(methods))
				}
				return
			}
			m := "GET"
			if i < len(methods) {
				m = methods[i]
			}
			resp, err := http.ReadResponse(br, &http.Request{Method: m})
			if err != nil {
				t.Fatalf("answer %d does not parse: %v\n%q", i, err, pc.out.Bytes())
			}
			b, err := io.ReadAll(resp.Body)
			if i >= len(methods) {
				if resp.StatusCode/100 != 4 || !resp.Close {
					t.Fatalf("answer %d with no request: %d close=%v", i, resp.StatusCode, resp.Close)
				}
				continue
			}
			// A handler that read a malformed body may be cut off; its
			// answer is then the connection's last.
			if err == nil && m != "HEAD" && string(b) != m {
				t.Fatalf("answer %d: %q for %s", i, b, m)
			}
		}
	})
}

// TestH1ClientStopsReading: a client that stops reading its answer is
// dropped once a write waits for it longer than the write timeout; the
// handler's write fails, so it ends and frees the guest's connection.
func TestH1ClientStopsReading(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ended := make(chan error, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		for {
			if _, err := w.Write(chunk); err != nil {
				ended <- err
				return
			}
		}
	})
	hs := &h1Serve{s: &Server{log: slog.New(slog.DiscardHandler)}, handler: h, fallback: newConnListener(ln.Addr()),
		conns: map[net.Conn]*h1Conn{}, writeTimeout: 300 * time.Millisecond}
	go func() {
		if c, err := ln.Accept(); err == nil {
			(&h1Conn{hs: hs, conn: c, raw: c, remote: c.RemoteAddr().String()}).serve()
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n") // and never reads
	select {
	case err := <-ended:
		t.Logf("the handler's write ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the handler still writes to a client that stopped reading")
	}
}
