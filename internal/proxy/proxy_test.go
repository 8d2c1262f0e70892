package proxy

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"

	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
)

const domain = "microvm.localhost"

// fakeBackend is a fake of our own Backend interface: VMs in memory, with
// counters to prove a refused request never woke a VM.
type fakeBackend struct {
	mu      sync.Mutex
	vms     map[string]*fakeVM
	ensures map[string]int
	open    map[string]int
}

type fakeVM struct {
	tgt        Target
	suspended  bool
	autoResume bool
}

func (b *fakeBackend) Lookup(ctx context.Context, id string) (Target, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	vm, ok := b.vms[id]
	if !ok {
		return Target{}, ErrNotFound
	}
	return vm.tgt, nil
}

func (b *fakeBackend) EnsureRunning(ctx context.Context, id string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ensures[id]++
	vm := b.vms[id]
	if vm.suspended {
		if !vm.autoResume {
			return ErrSuspended
		}
		vm.suspended = false
	}
	return nil
}

func (b *fakeBackend) ConnOpened(id string) { b.mu.Lock(); b.open[id]++; b.mu.Unlock() }
func (b *fakeBackend) ConnClosed(id string) { b.mu.Lock(); b.open[id]--; b.mu.Unlock() }

func (b *fakeBackend) counts(id string) (ensures, open int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ensures[id], b.open[id]
}

// guest is a real HTTP server on loopback standing in for one guest port.
func guest(t *testing.T, name string, h2c bool) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		var reserved []string
		for k := range r.Header {
			if strings.HasPrefix(strings.ToLower(k), "x-aws-proxy-") {
				reserved = append(reserved, k)
			}
		}
		json.NewEncoder(w).Encode(map[string]any{
			"reserved": reserved,
			"guest":    name, "host": r.Host, "auth": r.Header.Get(HeaderAuth), "port": r.Header.Get(HeaderPort),
			"xff": r.Header.Get("X-Forwarded-For"), "proto": r.Proto, "cookie": r.Header.Get("Cookie"), "tls": r.TLS != nil,
			"traffic": r.Header.Get(HeaderE2BTrafficToken), "envdToken": r.Header.Get(HeaderEnvdToken),
		})
	})
	mux.HandleFunc("/setcookie", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", CookieAuth+"=planted; Path=/")
		w.Header().Add("Set-Cookie", "app=1; Path=/")
	})
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("type") == "chunked" {
			w.Header().Set("Content-Type", "text/plain") // chunked, not SSE
		} else {
			w.Header().Set("Content-Type", "text/event-stream")
		}
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			// Hold the next event until the client saw this one: a proxy
			// that buffers would deadlock here and fail the test.
			select {
			case <-r.Context().Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
		}
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		seen := r.Header.Values("Sec-WebSocket-Protocol")
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"chat"},
			// The browser test's page comes from another origin.
			InsecureSkipVerify: true})
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := r.Context()
		c.Write(ctx, websocket.MessageText, []byte("protocols="+strings.Join(seen, ",")))
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil {
				return
			}
			c.Write(ctx, typ, append([]byte("echo:"), msg...))
		}
	})
	mux.HandleFunc("/reqtrailer", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var tr []string
		for k, vv := range r.Trailer {
			tr = append(tr, k+"="+strings.Join(vv, ","))
		}
		slices.Sort(tr)
		fmt.Fprintf(w, "%s|%s|%s", r.Proto, body, strings.Join(tr, ";"))
	})
	mux.HandleFunc("/grpc", func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			http.Error(w, "grpc needs h2", http.StatusHTTPVersionNotSupported)
			return
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
		body, _ := io.ReadAll(r.Body)
		w.Write(body)
		w.Header().Set("Grpc-Status", "0")
		w.Header().Set("Grpc-Message", "ok-"+name)
	})
	srv := &http.Server{Handler: mux}
	if name == "tls" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cert, err := tls.X509KeyPair(selfSignedCert(t))
		if err != nil {
			t.Fatal(err)
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
		go srv.ServeTLS(ln, "", "")
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().String()
	}
	if h2c {
		var p http.Protocols
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
		srv.Protocols = &p
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

type env struct {
	backend *fakeBackend
	signer  *token.Signer
	client  *http.Client
	roots   *x509.CertPool
	addr    string // proxy listener
}

func newEnv(t *testing.T) *env { t.Helper(); return newEnvFull(t, nil, nil) }

// newEnvGuests adds guest ports (port → loopback address) to newEnv's.
func newEnvGuests(t *testing.T, extra map[string]string) *env {
	t.Helper()
	return newEnvFull(t, extra, nil)
}

// newEnvWith is newEnv with the proxy's Config adjusted by edit.
func newEnvWith(t *testing.T, edit func(*Config)) *env {
	t.Helper()
	return newEnvFull(t, nil, edit)
}

func newEnvFull(t *testing.T, extra map[string]string, edit func(*Config)) *env {
	t.Helper()
	ca, roots, signer := testPKI(t)
	// Guest ports 8080 and 9000 of every VM are two loopback servers.
	ports := map[string]string{"8080": guest(t, "port8080", true), "9000": guest(t, "port9000", false), "8443": guest(t, "tls", false)}
	maps.Copy(ports, extra)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		_, port, _ := net.SplitHostPort(addr)
		real, ok := ports[port]
		if !ok {
			real = "127.0.0.1:1" // nothing listens: connection refused
		}
		var d net.Dialer
		return d.DialContext(ctx, network, real)
	}
	lo := netip.MustParseAddr("127.0.0.1")
	b := &fakeBackend{ensures: map[string]int{}, open: map[string]int{}, vms: map[string]*fakeVM{
		"vm1":       {tgt: Target{Account: "acct", Addr: lo, Ingress: true, Shell: true}},
		"vm2":       {tgt: Target{Account: "acct", Addr: lo, Ingress: true}},
		"noingress": {tgt: Target{Account: "acct", Addr: lo}},
		"sleepy":    {tgt: Target{Account: "acct", Addr: lo, Ingress: true}, suspended: true, autoResume: true},
		"frozen":    {tgt: Target{Account: "acct", Addr: lo, Ingress: true}, suspended: true},
		"otheracct": {tgt: Target{Account: "other", Addr: lo, Ingress: true}},
	}}
	cfg := Config{Domain: domain, Backend: b, Tokens: signer, Dial: dial}
	if edit != nil {
		edit(&cfg)
	}
	_, ln := serveProxy(t, cfg, ca)
	e := &env{backend: b, signer: signer, roots: roots, addr: ln.Addr().String()}
	e.client = &http.Client{Transport: e.transport(true), Timeout: 10 * time.Second}
	return e
}

// testPKI is the tests' CA (its certificate as the clients' roots) and
// token signer.
func testPKI(t *testing.T) (*tlsca.Manager, *x509.CertPool, *token.Signer) {
	t.Helper()
	dir := t.TempDir()
	ca, err := tlsca.Open(tlsca.Config{Domain: domain, Dir: filepath.Join(dir, "tls"), CAExport: filepath.Join(dir, "ca.pem")})
	if err != nil {
		t.Fatal(err)
	}
	signer, err := token.NewSigner([]byte(strings.Repeat("s", 32)))
	if err != nil {
		t.Fatal(err)
	}
	return ca, rootsFromFile(t, filepath.Join(dir, "ca.pem")), signer
}

// serveProxy runs a proxy of cfg with ca's certificate on a loopback
// port until the test ends.
func serveProxy(t *testing.T, cfg Config, ca *tlsca.Manager) (*Server, net.Listener) {
	t.Helper()
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln, ca.TLSConfig(), time.Second); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv, ln
}

func rootsFromFile(t *testing.T, path string) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in ca.pem")
	}
	return roots
}

// transport verifies the proxy against ca.pem like curl --cacert, and
// resolves every *.microvm.localhost name to the proxy listener.
func (e *env) transport(h2 bool) *http.Transport {
	tc := &tls.Config{RootCAs: e.roots}
	if !h2 {
		tc.NextProtos = []string{"http/1.1"}
	}
	return &http.Transport{
		TLSClientConfig:   tc,
		ForceAttemptHTTP2: h2,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, e.addr)
		},
	}
}

func (e *env) mint(t *testing.T, account, vm string, kind token.Kind, ports []token.PortRange, ttl time.Duration) string {
	tok, _, err := e.signer.Mint(account, vm, kind, ports, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestRouting(t *testing.T) {
	e := newEnv(t)
	all := []token.PortRange{token.AllPorts}
	only8080 := []token.PortRange{token.Port(8080)}
	past := e.signer.WithClock(func() time.Time { return time.Now().Add(-2 * time.Hour) })
	expired, _, _ := past.Mint("acct", "vm1", token.KindEndpoint, all, time.Minute)
	tests := []struct {
		name      string
		host      string
		tok       string
		port      string
		status    int
		guest     string
		wantWoken bool // EnsureRunning must (not) have been called
	}{
		{"default port 8080", "vm1", e.mint(t, "acct", "vm1", token.KindEndpoint, only8080, time.Minute), "", 200, "port8080", true},
		{"port header selects 9000", "vm1", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), "9000", 200, "port9000", true},
		{"range token", "vm1", e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{{From: 8000, To: 9000}}, time.Minute), "9000", 200, "port9000", true},
		{"no token", "vm2", "", "", 401, "", false},
		{"garbage token", "vm2", "nope", "", 401, "", false},
		{"expired token", "vm1", expired, "", 401, "", false},
		{"token of other vm", "vm2", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), "", 403, "", false},
		{"port out of scope", "vm2", e.mint(t, "acct", "vm2", token.KindEndpoint, only8080, time.Minute), "9000", 403, "", false},
		{"shell token on app port", "vm2", e.mint(t, "acct", "vm2", token.KindShell, all, time.Minute), "", 403, "", false},
		{"other account", "otheracct", e.mint(t, "acct", "otheracct", token.KindEndpoint, all, time.Minute), "", 403, "", false},
		{"no ingress", "noingress", e.mint(t, "acct", "noingress", token.KindEndpoint, all, time.Minute), "", 403, "", false},
		{"no shell ingress", "vm2", e.mint(t, "acct", "vm2", token.KindShell, all, time.Minute), "8022", 403, "", false},
		{"unknown vm", "ghost", e.mint(t, "acct", "ghost", token.KindEndpoint, all, time.Minute), "", 404, "", false},
		{"bad port header", "vm1", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), "http", 400, "", false},
		{"auto-resume", "sleepy", e.mint(t, "acct", "sleepy", token.KindEndpoint, all, time.Minute), "", 200, "port8080", true},
		{"suspended without auto-resume", "frozen", e.mint(t, "acct", "frozen", token.KindEndpoint, all, time.Minute), "", 503, "", true},
		{"guest port closed", "vm2", e.mint(t, "acct", "vm2", token.KindEndpoint, all, time.Minute), "7000", 502, "", true},
		{"bare domain", "", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), "", 404, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			host := tc.host + "." + domain
			if tc.host == "" {
				host = domain
			}
			before, _ := e.backend.counts(tc.host)
			req, _ := http.NewRequest("GET", "https://"+host+"/", nil)
			if tc.tok != "" {
				req.Header.Set(HeaderAuth, tc.tok)
			}
			if tc.port != "" {
				req.Header.Set(HeaderPort, tc.port)
			}
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, tc.status)
			}
			if resp.ProtoMajor != 2 {
				t.Errorf("client spoke %s, want HTTP/2", resp.Proto)
			}
			after, open := e.backend.counts(tc.host)
			if woken := after > before; woken != tc.wantWoken {
				t.Errorf("EnsureRunning called=%v, want %v", woken, tc.wantWoken)
			}
			if open != 0 {
				t.Errorf("%d connections still counted open", open)
			}
			if tc.guest == "" {
				return
			}
			var got map[string]string
			json.Unmarshal(body, &got)
			if got["guest"] != tc.guest || got["auth"] != "" || got["port"] != "" || got["host"] != host || got["xff"] == "" {
				t.Fatalf("guest saw %v", got)
			}
		})
	}
	if _, err := e.backend.Lookup(context.Background(), "sleepy"); err != nil || e.backend.vms["sleepy"].suspended {
		t.Error("auto-resume did not resume")
	}
}

func TestWebSocket(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.Port(9000)}, time.Minute)
	tests := []struct {
		name      string
		protos    []string
		header    http.Header
		wantProto string
	}{
		{"token in subprotocols", []string{SubprotoAuth + tok, SubprotoPort + "9000"}, nil, SubprotoPort + "9000"},
		{"token in subprotocols plus app protocol", []string{SubprotoAuth + tok, SubprotoPort + "9000", "chat"}, nil, "chat"},
		// AWS's browser list: the marker comes back when the app picks none.
		{"aws browser list", []string{SubprotoBase, SubprotoAuth + tok, SubprotoPort + "9000"}, nil, SubprotoBase},
		{"aws browser list plus unselected app protocol", []string{SubprotoBase, SubprotoAuth + tok, SubprotoPort + "9000", "other"}, nil, SubprotoBase},
		{"aws browser list plus app protocol", []string{SubprotoBase, SubprotoAuth + tok, SubprotoPort + "9000", "chat"}, nil, "chat"},
		{"token in headers", nil, http.Header{HeaderAuth: {tok}, HeaderPort: {"9000"}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			waitClosed(t, e, "vm1")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, resp, err := websocket.Dial(ctx, "wss://vm1."+domain+"/ws", &websocket.DialOptions{
				HTTPClient:   &http.Client{Transport: e.transport(false)},
				Subprotocols: tc.protos,
				HTTPHeader:   tc.header,
			})
			if err != nil {
				t.Fatalf("dial: %v (%v)", err, resp)
			}
			defer c.CloseNow()
			if c.Subprotocol() != tc.wantProto {
				t.Errorf("subprotocol %q, want %q", c.Subprotocol(), tc.wantProto)
			}
			_, first, err := c.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(first), "lambda-microvms") {
				t.Errorf("guest saw kiln subprotocols: %s", first)
			}
			if _, open := e.backend.counts("vm1"); open != 1 {
				t.Errorf("open connections during websocket = %d, want 1", open)
			}
			for i := 0; i < 3; i++ {
				msg := fmt.Sprintf("hello %d", i)
				if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
					t.Fatal(err)
				}
				_, got, err := c.Read(ctx)
				if err != nil || string(got) != "echo:"+msg {
					t.Fatalf("echo %q, %v", got, err)
				}
			}
			c.Close(websocket.StatusNormalClosure, "")
		})
	}
	waitClosed(t, e, "vm1")
	// Without a token the upgrade is refused before reaching the VM.
	_, resp, err := websocket.Dial(context.Background(), "wss://vm1."+domain+"/ws", &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: e.transport(false)}, Subprotocols: []string{SubprotoPort + "9000"}})
	if err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("tokenless websocket: %v %v", err, resp)
	}
}

// waitClosed waits until the proxy has noticed that earlier WebSockets
// closed (it sees the close a moment after the client).
func waitClosed(t *testing.T, e *env, id string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		if _, open := e.backend.counts(id); open == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("websocket still counted open after close")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestStreaming(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	for _, tc := range []struct {
		h2   bool
		kind string
	}{{true, "sse"}, {false, "sse"}, {true, "chunked"}, {false, "chunked"}} {
		h2 := tc.h2
		t.Run(fmt.Sprintf("%s h2=%v", tc.kind, h2), func(t *testing.T) {
			req, _ := http.NewRequest("GET", "https://vm1."+domain+"/sse?type="+tc.kind, nil)
			req.Header.Set(HeaderAuth, tok)
			req.Header.Set(HeaderPort, "9000")
			start := time.Now()
			resp, err := (&http.Client{Transport: e.transport(h2)}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			r := bufio.NewReader(resp.Body)
			var at []time.Duration
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					break
				}
				if strings.HasPrefix(line, "data:") {
					at = append(at, time.Since(start))
				}
			}
			if len(at) != 3 {
				t.Fatalf("got %d events", len(at))
			}
			// The first event must arrive well before the last (the guest
			// holds each for 300 ms): a buffering proxy sends them at once.
			// (No bound on the first from the request's start: that also
			// counts TLS set-up, which a loaded host can make long.)
			if at[2]-at[0] < 400*time.Millisecond {
				t.Fatalf("events arrived at %v: buffered", at)
			}
		})
	}
}

func TestGRPCTrailers(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	req, _ := http.NewRequest("POST", "https://vm1."+domain+"/grpc", strings.NewReader("\x00\x00\x00\x00\x05hello"))
	req.Header.Set(HeaderAuth, tok)
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 || string(body) != "\x00\x00\x00\x00\x05hello" {
		t.Fatalf("status %d proto %s body %q", resp.StatusCode, resp.Proto, body)
	}
	if resp.Trailer.Get("Grpc-Status") != "0" || resp.Trailer.Get("Grpc-Message") != "ok-port8080" {
		t.Fatalf("trailers %v", resp.Trailer)
	}
}

// TestRequestTrailers: a request's declared trailers reach the app over
// h2 and HTTP/1.1, on the general path (a body that is not whole with its
// head), to an HTTP/1.1 app and over forced h2c, less any that would
// carry the token (as the header field, in a cookie, as a subprotocol).
// They used to reach it as names without values. A trailer no request
// may have (Content-Length) is dropped, not answered with a 502.
func TestRequestTrailers(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	for _, run := range []struct{ h2, forceH2 bool }{{true, false}, {false, false}, {true, true}, {false, true}} {
		c := e.client
		if !run.h2 {
			c = &http.Client{Transport: e.transport(false), Timeout: 10 * time.Second}
		}
		pr, pw := io.Pipe()
		req, _ := http.NewRequest("POST", "https://vm1."+domain+"/reqtrailer", pr)
		req.Header.Set(HeaderAuth, tok)
		if run.forceH2 {
			req.Header.Set(HeaderForceH2, "true")
		}
		req.Trailer = http.Header{"X-Check": nil, HeaderAuth: nil, "Cookie": nil, fieldWSProtocol: nil}
		go func() {
			pw.Write([]byte("part"))
			req.Trailer.Set("X-Check", "sum-42")
			// None of these is the guest's to see.
			req.Trailer.Set(HeaderAuth, tok)
			req.Trailer.Set("Cookie", CookieAuth+"="+tok+"; other=1")
			req.Trailer.Set(fieldWSProtocol, SubprotoAuth+tok)
			pw.Close()
		}()
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		proto := "HTTP/1.1"
		if run.forceH2 {
			proto = "HTTP/2.0"
		}
		if want := proto + "|part|X-Check=sum-42"; string(body) != want {
			t.Errorf("%+v: the app saw %q, want %q", run, body, want)
		}
	}

	// A content-length trailer, which Go's clients will not send.
	r := dialH2(t, e.addr)
	r.headers(1, false, ":method", "POST", ":scheme", "https", ":authority", "vm1."+domain, ":path", "/reqtrailer",
		"x-aws-proxy-auth", tok, "trailer", "content-length, x-check")
	r.fr.WriteData(1, false, []byte("part"))
	r.headers(1, true, "content-length", "99", "x-check", "a")
	var status, body string
	for done := false; !done; {
		switch f := r.until("the answer", func(http2.Frame) bool { return true }).(type) {
		case *http2.MetaHeadersFrame:
			status, done = f.PseudoValue("status"), f.StreamEnded()
		case *http2.DataFrame:
			body += string(f.Data())
			done = f.StreamEnded()
		case *http2.RSTStreamFrame, *http2.GoAwayFrame:
			t.Fatalf("content-length trailer: %v", f)
		}
	}
	if status != "200" || body != "HTTP/1.1|part|X-Check=a" {
		t.Errorf("content-length trailer: %s %q, want 200 with X-Check only", status, body)
	}
}

func TestMicrovmFromHost(t *testing.T) {
	s := &Server{cfg: Config{Domain: domain}}
	tests := []struct {
		host, id string
		ok       bool
	}{
		{"abc." + domain, "abc", true},
		{"ABC." + domain + ":8443", "abc", true},
		{"abc." + domain + ".", "abc", true},
		{domain, "", false},
		{"a.b." + domain, "", false},
		{"abc.evil.test", "", false},
		{"abc" + domain, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.host, func(t *testing.T) {
			id, ok := s.microvmFromHost(tc.host)
			if id != tc.id || ok != tc.ok {
				t.Fatalf("got %q %v", id, ok)
			}
		})
	}
}

// A link with ?kiln-proxy-auth= (what the console opens in a new tab)
// turns a valid token into an HttpOnly cookie of that host and redirects
// without it; the cookie then authorizes requests, the guest never sees
// it, and a guest cannot set it.
func TestTokenLinkCookie(t *testing.T) {
	e := newEnv(t)
	noRedirect := &http.Client{Transport: e.transport(false), Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	tok := e.mint(t, "acct", "vm2", token.KindEndpoint, []token.PortRange{token.Port(8080)}, time.Minute)
	get := func(url, cookie string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		if cookie != "" {
			req.Header.Set("Cookie", cookie)
		}
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	base := "https://vm2." + domain
	resp := get(base+"/app?x=1&"+QueryAuth+"="+tok, "")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/app?x=1" {
		t.Fatalf("token link: %d Location %q, want 303 to /app?x=1", resp.StatusCode, resp.Header.Get("Location"))
	}
	var ck *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == CookieAuth {
			ck = c
		}
	}
	if ck == nil || ck.Value != tok || !ck.HttpOnly || !ck.Secure || ck.SameSite != http.SameSiteLaxMode || ck.Domain != "" {
		t.Fatalf("cookie %+v: want the token, HttpOnly, Secure, SameSite=Lax, host-only", ck)
	}
	resp = get(base+"/app?x=1", CookieAuth+"="+tok+"; other=2")
	var seen map[string]string
	json.NewDecoder(resp.Body).Decode(&seen)
	if resp.StatusCode != 200 || seen["guest"] != "port8080" {
		t.Fatalf("with the cookie: %d %v", resp.StatusCode, seen)
	}
	if strings.Contains(seen["cookie"], CookieAuth) || seen["cookie"] != "other=2" {
		t.Errorf("guest saw Cookie %q: the token must be stripped, other cookies kept", seen["cookie"])
	}
	resp = get(base+"/setcookie", CookieAuth+"="+tok)
	for _, c := range resp.Cookies() {
		if c.Name == CookieAuth {
			t.Errorf("guest planted %s=%s through the proxy", c.Name, c.Value)
		}
	}
	if len(resp.Cookies()) != 1 {
		t.Errorf("guest's other cookies must pass: %v", resp.Cookies())
	}
	for name, c := range map[string]struct {
		url  string
		code int
	}{
		"garbage token":      {base + "/?" + QueryAuth + "=nope", 401},
		"other vm's token":   {"https://vm1." + domain + "/?" + QueryAuth + "=" + tok, 403},
		"shell token":        {base + "/?" + QueryAuth + "=" + e.mint(t, "acct", "vm2", token.KindShell, []token.PortRange{token.AllPorts}, time.Minute), 403},
		"no token no cookie": {base + "/", 401},
	} {
		resp := get(c.url, "")
		if resp.StatusCode != c.code || len(resp.Cookies()) != 0 {
			t.Errorf("%s: %d cookies %v, want %d and none", name, resp.StatusCode, resp.Cookies(), c.code)
		}
	}
}

// FuzzAuthCookieFilters: whatever Cookie a client or Set-Cookie a guest
// sends, the token cookie never passes through the filters.
func FuzzAuthCookieFilters(f *testing.F) {
	f.Add("a=1; kiln-proxy-auth=tok; b=2", "kiln-proxy-auth=x; Path=/")
	f.Add("kiln-proxy-auth=tok", "KILN-PROXY-AUTH=x")
	f.Add(";;; =; kiln-proxy-auth", " kiln-proxy-auth =x")
	// Go's cookie reader trims the name: "name =value" is the token cookie
	// too (the proxy read the token from it, and forwarded it).
	f.Add("a=1; kiln-proxy-auth =tok", "a=1")
	f.Add("kiln-proxy-auth\t= tok", "a=1")
	// A nameless cookie goes back as its value: "kiln-proxy-auth=x".
	f.Add("a=1", "=kiln-proxy-auth=x; Domain=microvm.localhost; Path=/")
	f.Add("a=1", " = kiln-proxy-auth ; Path=/")
	f.Fuzz(func(t *testing.T, cookie, setCookie string) {
		h := http.Header{}
		h.Add("Cookie", cookie)
		stripAuthCookie(h)
		r := &http.Request{Header: h}
		for _, c := range r.Cookies() {
			if c.Name == CookieAuth {
				t.Fatalf("Cookie %q kept %s", cookie, c.Name)
			}
		}
		rh := http.Header{}
		rh.Add("Set-Cookie", setCookie)
		dropSetCookie(rh, CookieAuth)
		for _, c := range (&http.Response{Header: rh}).Cookies() {
			if strings.EqualFold(c.Name, CookieAuth) {
				t.Fatalf("Set-Cookie %q kept %s", setCookie, c.Name)
			}
		}
		for _, v := range rh.Values("Set-Cookie") {
			back := &http.Request{Header: http.Header{"Cookie": {browserReturns(v)}}}
			if _, err := back.Cookie(CookieAuth); err == nil {
				t.Fatalf("Set-Cookie %q kept: a browser sends it back as %q", v, browserReturns(v))
			}
		}
	})
}

// browserReturns is the Cookie field a browser sends for a cookie stored
// from Set-Cookie v (RFC 6265bis 5.6: the pair before the first ";",
// the name before its first "=", both trimmed; a nameless cookie, or a
// pair without "=", goes back as its value alone).
func browserReturns(v string) string {
	pair, _, _ := strings.Cut(v, ";")
	name, value, found := strings.Cut(pair, "=")
	if !found {
		name, value = "", name
	}
	name, value = strings.TrimSpace(name), strings.TrimSpace(value)
	if name == "" {
		return value
	}
	return name + "=" + value
}

// TestProxyHeaders: AWS reserves x-aws-proxy-*; none reaches the app, in
// any spelling, and X-aws-proxy-force-h2: true speaks h2c to the app even
// when the client came over HTTP/1.1 (the old proxy forwarded every
// reserved header but the token and the port, and always spoke HTTP/1.1).
func TestProxyHeaders(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	h1 := &http.Client{Transport: e.transport(false), Timeout: 10 * time.Second}
	for _, tc := range []struct {
		name      string
		headers   map[string]string
		wantProto string
	}{
		{"plain", map[string]string{"x-aws-proxy-foo": "1", "X-AWS-PROXY-BAR": "2", "x-aws-proxy-force-h2": "no"}, "HTTP/1.1"},
		{"force h2", map[string]string{"X-aws-proxy-force-h2": "true", "x-aws-proxy-trace": "1"}, "HTTP/2.0"},
		{"force h2 any case", map[string]string{"x-aws-proxy-force-h2": "TRUE"}, "HTTP/2.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
			req.Header.Set(HeaderAuth, tok)
			req.Header.Set(HeaderPort, "8080")
			for k, v := range tc.headers {
				req.Header[k] = []string{v} // as sent, not canonicalized
			}
			resp, err := h1.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got struct {
				Reserved []string `json:"reserved"`
				Proto    string   `json:"proto"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != 200 {
				t.Fatalf("status %d, %v", resp.StatusCode, err)
			}
			if len(got.Reserved) != 0 {
				t.Errorf("the app saw reserved headers %v", got.Reserved)
			}
			if got.Proto != tc.wantProto {
				t.Errorf("the app was spoken to in %s, want %s", got.Proto, tc.wantProto)
			}
		})
	}
}

// FuzzSubprotocols: whatever a client offers, the app never sees one of
// the platform's subprotocols (the token rides in one), and the echo is
// one the client offered.
func FuzzSubprotocols(f *testing.F) {
	f.Add("lambda-microvms, lambda-microvms.authentication.tok, lambda-microvms.port.9000")
	f.Add("chat,lambda-microvms")
	f.Add(" lambda-microvms.port.1 ,, lambda-microvms.authentication.")
	f.Add("LAMBDA-MICROVMS")
	f.Fuzz(func(t *testing.T, offered string) {
		vals := []string{offered}
		for _, p := range appProtocols(vals) {
			if isKilnProtocol(p) {
				t.Fatalf("app would see %q", p)
			}
		}
		echo := kilnProtocolEcho(vals)
		if echo != "" && !slices.Contains(splitProtocols(vals), echo) {
			t.Fatalf("echo %q was not offered in %q", echo, offered)
		}
		h := http.Header{"X-Aws-Proxy-" + offered: {"1"}, HeaderAuth: {"t"}}
		stripProxyHeaders(h)
		for k := range h {
			if strings.HasPrefix(strings.ToLower(k), "x-aws-proxy-") {
				t.Fatalf("kept %q", k)
			}
		}
	})
}

// selfSignedCert is an app's own certificate, as apps that serve TLS
// inside a VM have.
func selfSignedCert(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "app"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"app"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// TestTLSApp: an app that serves TLS is reached by re-encrypting (AWS's
// proxy detects it), over h2 when the app offers it and over HTTP/1.1 for
// a WebSocket; the old proxy spoke plaintext to it and got a 400.
func TestTLSApp(t *testing.T) {
	e := newEnv(t)
	tok := e.mint(t, "acct", "vm1", token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute)
	for i := 0; i < 2; i++ { // the second time from the memo
		req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
		req.Header.Set(HeaderAuth, tok)
		req.Header.Set(HeaderPort, "8443")
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			TLS   bool   `json:"tls"`
			Proto string `json:"proto"`
			Auth  string `json:"auth"`
		}
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if resp.StatusCode != 200 || err != nil {
			t.Fatalf("status %d, %v", resp.StatusCode, err)
		}
		if !got.TLS || got.Proto != "HTTP/2.0" || got.Auth != "" {
			t.Errorf("app saw tls=%v proto=%s auth=%q, want TLS, HTTP/2.0 and no token", got.TLS, got.Proto, got.Auth)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "wss://vm1."+domain+"/ws", &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: e.transport(false)},
		Subprotocols: []string{SubprotoBase, SubprotoAuth + tok, SubprotoPort + "8443"},
	})
	if err != nil {
		t.Fatalf("websocket to a TLS app: %v (%v)", err, resp)
	}
	defer c.CloseNow()
	c.Read(ctx) // the app's "protocols=" line
	if err := c.Write(ctx, websocket.MessageText, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := c.Read(ctx); err != nil || string(msg) != "echo:x" {
		t.Fatalf("echo %q, %v", msg, err)
	}
	c.Close(websocket.StatusNormalClosure, "")
	// A plaintext app on another port is still spoken to in plaintext.
	req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
	req.Header.Set(HeaderAuth, tok)
	req.Header.Set(HeaderPort, "9000")
	resp, err = e.client.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("plaintext app: %v %v", err, resp)
	}
	resp.Body.Close()
}

// FuzzHasQueryAuth: the shortcut must agree with parsing the query, also
// for a name spelled with percent escapes (otherwise a link's token would
// reach the guest instead of becoming the cookie).
func FuzzHasQueryAuth(f *testing.F) {
	for _, s := range []string{"", "a=1", QueryAuth + "=t", "x=1&" + QueryAuth, "kiln%2Dproxy%2Dauth=t", "kiln-proxy%2dauth",
		"%zz&" + QueryAuth + "=1", "kiln+proxy+auth=1", ";" + QueryAuth + "=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		want := (&url.URL{RawQuery: raw}).Query().Has(QueryAuth)
		if got := hasQueryAuth(raw); got != want {
			t.Fatalf("hasQueryAuth(%q) = %v, parsing says %v", raw, got, want)
		}
	})
}

// runningFake adds RunningNow to fakeBackend: true for a VM that is not
// suspended, counting the calls.
type runningFake struct {
	*fakeBackend
	asked map[string]int
}

func (b *runningFake) RunningNow(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.asked[id]++
	vm, ok := b.vms[id]
	return ok && !vm.suspended
}

// TestRunningNow: a Backend's RunningNow spares a running VM's request
// EnsureRunning, but only after the token, account and ingress checks (a
// refused request asks neither), a VM RunningNow does not vouch for still
// goes through EnsureRunning (auto-resume, 503 without it), and an
// unknown or terminated VM is 404 from Lookup whatever RunningNow says.
func TestRunningNow(t *testing.T) {
	var rb *runningFake
	e := newEnvWith(t, func(c *Config) {
		rb = &runningFake{fakeBackend: c.Backend.(*fakeBackend), asked: map[string]int{}}
		c.Backend = rb
	})
	all := []token.PortRange{token.AllPorts}
	tests := []struct {
		name, vm, tok      string
		status             int
		wantAsked, wantEns bool
	}{
		{"running: no EnsureRunning", "vm1", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), 200, true, false},
		{"no token: nothing asked", "vm1", "", 401, false, false},
		{"token of another vm: nothing asked", "vm2", e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute), 403, false, false},
		{"other account: nothing asked", "otheracct", e.mint(t, "acct", "otheracct", token.KindEndpoint, all, time.Minute), 403, false, false},
		{"no ingress: nothing asked", "noingress", e.mint(t, "acct", "noingress", token.KindEndpoint, all, time.Minute), 403, false, false},
		{"unknown vm: 404 before asking", "ghost", e.mint(t, "acct", "ghost", token.KindEndpoint, all, time.Minute), 404, false, false},
		{"suspended: EnsureRunning resumes", "sleepy", e.mint(t, "acct", "sleepy", token.KindEndpoint, all, time.Minute), 200, true, true},
		{"suspended without auto-resume: 503", "frozen", e.mint(t, "acct", "frozen", token.KindEndpoint, all, time.Minute), 503, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rb.mu.Lock()
			asked0, ens0 := rb.asked[tc.vm], rb.ensures[tc.vm]
			rb.mu.Unlock()
			req, _ := http.NewRequest("GET", "https://"+tc.vm+"."+domain+"/", nil)
			if tc.tok != "" {
				req.Header.Set(HeaderAuth, tc.tok)
			}
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, tc.status)
			}
			rb.mu.Lock()
			asked, ens := rb.asked[tc.vm] > asked0, rb.ensures[tc.vm] > ens0
			rb.mu.Unlock()
			if asked != tc.wantAsked || ens != tc.wantEns {
				t.Errorf("RunningNow asked %v, EnsureRunning called %v; want %v, %v", asked, ens, tc.wantAsked, tc.wantEns)
			}
		})
	}
	// Terminated: the backend forgets the VM; the next request is 404 at
	// once, although RunningNow had vouched for it a request earlier.
	rb.mu.Lock()
	delete(rb.vms, "vm1")
	rb.mu.Unlock()
	req, _ := http.NewRequest("GET", "https://vm1."+domain+"/", nil)
	req.Header.Set(HeaderAuth, e.mint(t, "acct", "vm1", token.KindEndpoint, all, time.Minute))
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("terminated vm: status %d, want 404", resp.StatusCode)
	}
}
