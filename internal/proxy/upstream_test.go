package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// rawGuest is a guest port served by hand, one connection at a time per
// accept: serve gets each connection and what it read of each request.
func rawGuest(t *testing.T, serve func(c net.Conn, br *bufio.Reader)) (string, *atomic.Int32) {
	t.Helper()
	return rawGuestOn(t, net.ListenConfig{}, serve)
}

// rawGuestOn is rawGuest on a listener made by lc.
func rawGuestOn(t *testing.T, lc net.ListenConfig, serve func(c net.Conn, br *bufio.Reader)) (string, *atomic.Int32) {
	t.Helper()
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var conns atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				serve(c, bufio.NewReader(c))
			}()
		}
	}()
	return ln.Addr().String(), &conns
}

func (e *env) get(t *testing.T, h2 bool, port string, hdr http.Header) (*http.Response, []byte, error) {
	t.Helper()
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	c := &http.Client{Transport: e.transport(h2), Timeout: 10 * time.Second}
	req, _ := http.NewRequest("GET", "https://vm1."+domain+"/path?q=1", nil)
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set(HeaderAuth, tok)
	req.Header.Set(HeaderPort, port)
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

// TestUpstreamHeaders: on the direct HTTP/1.1 path the app sees what
// ReverseProxy let it see: no hop-by-hop headers (also those the client
// named in Connection), no x-aws-proxy-* header, no token cookie, kiln's
// X-Forwarded-* only (none the client planted), the client's Host; and
// the client gets no hop-by-hop header and no token cookie from the app.
func TestUpstreamHeaders(t *testing.T) {
	type seen struct {
		Header http.Header
		Host   string
		URI    string
	}
	app := http.NewServeMux()
	app.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Connection", "X-App-Hop")
		w.Header().Set("X-App-Hop", "1")
		w.Header().Add("Set-Cookie", CookieAuth+"=planted")
		w.Header().Add("Set-Cookie", "app=1")
		json.NewEncoder(w).Encode(seen{r.Header, r.Host, r.RequestURI})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: app}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	e := newEnvGuests(t, map[string]string{"7000": ln.Addr().String()})
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			hdr := http.Header{
				"Proxy-Authorization": {"Basic eA=="},
				"X-Aws-Proxy-Other":   {"1"},
				"Cookie":              {CookieAuth + "=tok; app=1"},
				"X-Forwarded-For":     {"203.0.113.9"},
				"X-Forwarded-Host":    {"evil.example"},
				"Forwarded":           {"for=203.0.113.9"},
				"Te":                  {"trailers"},
			}
			if !h2 { // HTTP/2 has no Connection header
				hdr["Connection"] = []string{"X-Hop"}
				hdr["X-Hop"] = []string{"secret"}
			}
			resp, body, err := e.get(t, h2, "7000", hdr)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("status %v, %v: %s", resp, err, body)
			}
			var got seen
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"X-Hop", "Proxy-Authorization", "Connection", HeaderAuth, HeaderPort, "X-Aws-Proxy-Other", "Forwarded"} {
				if v, ok := got.Header[k]; ok {
					t.Errorf("the app saw %s: %v", k, v)
				}
			}
			if c := got.Header.Get("Cookie"); c != "app=1" {
				t.Errorf("the app saw Cookie %q, want app=1", c)
			}
			if xff := got.Header.Get("X-Forwarded-For"); xff != "127.0.0.1" {
				t.Errorf("X-Forwarded-For %q", xff)
			}
			if got.Header.Get("X-Forwarded-Host") != "vm1."+domain || got.Header.Get("X-Forwarded-Proto") != "https" || got.Host != "vm1."+domain {
				t.Errorf("forwarded host %q proto %q, Host %q", got.Header.Get("X-Forwarded-Host"), got.Header.Get("X-Forwarded-Proto"), got.Host)
			}
			if got.Header.Get("Te") != "trailers" || got.URI != "/path?q=1" {
				t.Errorf("Te %q, URI %q", got.Header.Get("Te"), got.URI)
			}
			if _, ok := got.Header["User-Agent"]; !ok {
				t.Errorf("the client's User-Agent was dropped")
			}
			for _, k := range []string{"Keep-Alive", "X-App-Hop"} {
				if v := resp.Header.Get(k); v != "" {
					t.Errorf("the client got hop header %s: %s", k, v)
				}
			}
			if sc := resp.Header.Values("Set-Cookie"); len(sc) != 1 || sc[0] != "app=1" {
				t.Errorf("the client got Set-Cookie %v, want only app=1", sc)
			}
		})
	}
}

// TestUpstreamHostileGuest: what a guest answers cannot hurt the proxy.
// An endless header is cut at upMaxHeader (502), also after a 103; more
// than max1xx informational answers, or a status below 100, are a 502
// (not a stuck loop or a handler's panic); a protocol switch the
// client did not ask for is refused (502), a body cut short is not
// passed off as whole, and a keep-alive connection the guest dropped
// while idle costs the next request nothing (it is sent again).
func TestUpstreamHostileGuest(t *testing.T) {
	readReq := func(br *bufio.Reader) bool {
		_, err := http.ReadRequest(br)
		return err == nil
	}
	// overBound writes the start of an answer head larger than the bound.
	overBound := func(c net.Conn) bool {
		io.WriteString(c, "HTTP/1.1 200 OK\r\n")
		line := "X-Fill: " + strings.Repeat("a", 8<<10) + "\r\n"
		for i := 0; i < (upMaxHeader/len(line))+100; i++ {
			if _, err := io.WriteString(c, line); err != nil {
				return false
			}
		}
		return true
	}
	endless, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		if readReq(br) {
			overBound(c)
		}
	})
	switching, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		if readReq(br) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: Upgrade\r\n\r\n")
		}
	})
	short, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		if readReq(br) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
		}
	})
	// Answers one request per connection as keep-alive, then hangs up:
	// the pooled connection is dead when the next request comes.
	dropper, dropperConns := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		if readReq(br) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	const ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	// Informational answers: each head is bounded as the first is (an
	// endless one after a 103 was read whole), and at most max1xx pass.
	hints := func(n int, final string) string {
		g, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
			if !readReq(br) {
				return
			}
			io.WriteString(c, strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n", n))
			if final != "" {
				io.WriteString(c, final)
				return
			}
			// Over the bound, then a whole answer: read unbounded, it
			// would pass.
			if overBound(c) {
				io.WriteString(c, "Content-Length: 2\r\n\r\nok")
			}
		})
		return g
	}
	lowStatus, _ := rawGuest(t, func(c net.Conn, br *bufio.Reader) {
		if readReq(br) {
			io.WriteString(c, "HTTP/1.1 042 Odd\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	e := newEnvGuests(t, map[string]string{"7001": endless, "7002": switching, "7003": short, "7004": dropper,
		"7005": hints(1, ""), "7006": hints(max1xx, ok), "7007": hints(max1xx+1, ok), "7008": lowStatus})

	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			if resp, _, err := e.get(t, h2, "7001", nil); err != nil || resp.StatusCode != http.StatusBadGateway {
				t.Errorf("endless header: %v, %v; want 502", resp, err)
			}
			if resp, _, err := e.get(t, h2, "7002", nil); err != nil || resp.StatusCode != http.StatusBadGateway {
				t.Errorf("unasked 101: %v, %v; want 502", resp, err)
			}
			if resp, _, err := e.get(t, h2, "7005", nil); err != nil || resp.StatusCode != http.StatusBadGateway {
				t.Errorf("endless header after a 103: %v, %v; want 502", resp, err)
			}
			if resp, body, err := e.get(t, h2, "7006", nil); err != nil || resp.StatusCode != 200 || string(body) != "ok" {
				t.Errorf("%d 103s, then 200: %v %q %v", max1xx, resp, body, err)
			}
			if resp, _, err := e.get(t, h2, "7007", nil); err != nil || resp.StatusCode != http.StatusBadGateway {
				t.Errorf("%d 103s: %v, %v; want 502", max1xx+1, resp, err)
			}
			if resp, _, err := e.get(t, h2, "7008", nil); err != nil || resp.StatusCode != http.StatusBadGateway {
				t.Errorf("status 042: %v, %v; want 502", resp, err)
			}
			if resp, body, err := e.get(t, h2, "7003", nil); err == nil {
				t.Errorf("short body passed as whole: %d %q", resp.StatusCode, body)
			}
			// The first request also probes the port for TLS (a connection
			// of its own); count from the second.
			if resp, _, err := e.get(t, h2, "7004", nil); err != nil || resp.StatusCode != 200 {
				t.Fatalf("dropper: %v %v", resp, err)
			}
			before := dropperConns.Load()
			for i := 0; i < 3; i++ {
				// Let the guest's hang-up reach the pooled connection first.
				time.Sleep(50 * time.Millisecond)
				if resp, body, err := e.get(t, h2, "7004", nil); err != nil || resp.StatusCode != 200 || string(body) != "ok" {
					t.Fatalf("request %d after the guest dropped the idle connection: %v %q %v", i, resp, body, err)
				}
			}
			if n := dropperConns.Load() - before; n != 3 {
				t.Errorf("%d connections for 3 requests", n)
			}
		})
	}
}

// TestUpstreamKeepAlive: sequential requests share one connection to the
// guest, and a client that leaves a stream frees the guest's connection
// and the VM's activity count at once.
func TestUpstreamKeepAlive(t *testing.T) {
	var conns atomic.Int32
	app := http.NewServeMux()
	app.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hi") })
	left := make(chan struct{}, 1)
	app.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			left <- struct{}{}
		case <-time.After(30 * time.Second):
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: app, ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	e := newEnvGuests(t, map[string]string{"7005": ln.Addr().String()})
	e.get(t, false, "7005", nil) // the first request also probes the port for TLS
	conns.Store(0)
	for i := 0; i < 20; i++ {
		if resp, body, err := e.get(t, false, "7005", nil); err != nil || string(body) != "hi" {
			t.Fatalf("request %d: %v %q %v", i, resp, body, err)
		}
	}
	if n := conns.Load(); n != 0 {
		t.Errorf("20 sequential requests opened %d more connections to the guest, want none", n)
	}

	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	for _, h2 := range []bool{false, true} {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://vm1."+domain+"/stream", nil)
		req.Header.Set(HeaderAuth, tok)
		req.Header.Set(HeaderPort, "7005")
		resp, err := (&http.Client{Transport: e.transport(h2)}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil || line != "first\n" {
			t.Fatalf("stream (h2 %v): %q %v", h2, line, err)
		}
		cancel()
		resp.Body.Close()
		select {
		case <-left:
		case <-time.After(5 * time.Second):
			t.Fatalf("the guest's connection stayed open after the client left the stream (h2 %v)", h2)
		}
		waitClosed(t, e, "vm1")
	}
}

// FuzzOutgoingHeaders: whatever headers a client sends, the request the
// direct path writes to the guest carries no x-aws-proxy-* header, no
// token cookie, no hop-by-hop header and nothing the client named in
// Connection, and exactly kiln's X-Forwarded-For.
func FuzzOutgoingHeaders(f *testing.F) {
	f.Add("X-Aws-Proxy-Auth", "tok", "X-Secret", CookieAuth+"=tok; app=1", "trailers", "GET")
	f.Add("x-aws-proxy-port", "8080", "keep-alive, X-AWS-PROXY-AUTH", "app=1;"+CookieAuth+"=t", "gzip", "GET")
	f.Add("Sec-WebSocket-Protocol", SubprotoAuth+"t, chat", "Upgrade", " "+CookieAuth+" = t ", "TRAILERS, x", "GET")
	// Only kiln's subprotocols: none is left for the app, the field goes.
	f.Add("Sec-WebSocket-Protocol", SubprotoBase+", "+SubprotoAuth+"t", "", "", "", "GET")
	f.Add("X-Forwarded-For", "203.0.113.1", "", "", "", "GET")
	f.Add("X-Multi", "a\tb ", "", "", "", "GET")
	f.Add("A", "1", "", "", "", "POST")
	f.Add("A", "1", "", "", "", "PATCH")
	f.Add("A", "1", "", "", "", "DELETE")
	f.Fuzz(func(t *testing.T, name, value, connection, cookie, te, method string) {
		// net/http's server refuses what is not a header field (400)
		// before a handler runs; only what it lets through reaches kiln.
		if !validFieldName(name) || !validFieldName(method) || method == "CONNECT" || !validFieldValue(value) || !validFieldValue(connection) || !validFieldValue(cookie) || !validFieldValue(te) {
			t.Skip()
		}
		r := httptest.NewRequest(method, "https://vm1."+domain+"/x", nil)
		r.RemoteAddr = "192.0.2.7:4000"
		// Canonical keys, as net/http's servers (HTTP/1.1 and h2) store them.
		r.Header[http.CanonicalHeaderKey(name)] = []string{value}
		r.Header.Set(HeaderAuth, "tok")
		r.Header["Connection"] = []string{connection}
		r.Header["Cookie"] = []string{cookie}
		r.Header["Te"] = []string{te}
		out := outgoing(r, &url.URL{Scheme: "http", Host: "127.0.0.1:8080"}, false)
		var b strings.Builder
		bw := bufio.NewWriter(&b)
		if err := writeHead(bw, out); err != nil {
			t.Fatal(err)
		}
		bw.Flush()
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(b.String())))
		if err != nil {
			t.Fatalf("the guest could not read what kiln wrote: %v\n%s", err, b.String())
		}
		// What Request.Write (http.Transport's writer) would have sent
		// reads the same.
		var ref strings.Builder
		if err := out.Write(&ref); err != nil {
			t.Fatal(err)
		}
		want, err := http.ReadRequest(bufio.NewReader(strings.NewReader(ref.String())))
		if err != nil {
			t.Fatal(err)
		}
		if req.Method != want.Method || req.RequestURI != want.RequestURI || req.Host != want.Host ||
			req.ContentLength != want.ContentLength || !reflect.DeepEqual(req.Header, want.Header) {
			t.Fatalf("writeHead wrote\n%s\nRequest.Write\n%s", b.String(), ref.String())
		}
		for k, vv := range req.Header {
			if strings.HasPrefix(strings.ToLower(k), "x-aws-proxy-") {
				t.Fatalf("the guest got %s: %v", k, vv)
			}
			for _, h := range []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
				"Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
				if strings.EqualFold(k, h) && !(h == "Te" && len(vv) == 1 && vv[0] == "trailers") {
					t.Fatalf("the guest got hop header %s: %v", k, vv)
				}
			}
		}
		for _, p := range splitProtocols(req.Header.Values(wsProtocolField)) {
			if isKilnProtocol(p) {
				t.Fatalf("the guest got kiln's subprotocol %q", p)
			}
		}
		for _, c := range req.Cookies() {
			if c.Name == CookieAuth {
				t.Fatalf("the guest got the token cookie: %q", req.Header.Get("Cookie"))
			}
		}
		for _, named := range strings.Split(connection, ",") {
			named = strings.Trim(named, " \t") // optional white space (RFC 9110 5.6.3)
			if named != "" && !strings.EqualFold(named, "X-Forwarded-For") && !strings.EqualFold(named, "X-Forwarded-Host") &&
				!strings.EqualFold(named, "X-Forwarded-Proto") && !strings.EqualFold(named, "User-Agent") && req.Header.Get(named) != "" {
				t.Fatalf("the guest got %s, named in Connection", named)
			}
		}
		if xff := req.Header.Values("X-Forwarded-For"); len(xff) != 1 || xff[0] != "192.0.2.7" {
			t.Fatalf("X-Forwarded-For %q", xff)
		}
	})
}

// TestTLSProbeOfEndedRequestNotKept: a TLS probe cut short by its
// request's end (a client that left) says nothing of the port: it is not
// kept, and the next request probes again and speaks TLS to a TLS app.
func TestTLSProbeOfEndedRequestNotKept(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer app.Close()
	host := app.Listener.Addr().String()
	ctx, leave := context.WithCancel(context.Background())
	var dials atomic.Int32
	s := &Server{tlsPorts: map[string]tlsProbe{}, cfg: Config{Dial: func(dctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(dctx, network, addr)
		if dials.Add(1) == 1 {
			leave() // the client goes away during the first probe
		}
		return c, err
	}}}
	s.speaksTLS(ctx, host)
	if !s.speaksTLS(context.Background(), host) {
		t.Fatal("after a probe cut short by the client, the TLS app's port counts as plain HTTP")
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d probes, want 2 (the cut one not kept)", n)
	}
}
