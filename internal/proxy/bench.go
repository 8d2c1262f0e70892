package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// BenchOptions sizes Bench. Zero values take the defaults.
type BenchOptions struct {
	Requests    int           // sequential requests for latency (default 2000)
	Concurrency int           // parallel clients for throughput (default 32)
	Duration    time.Duration // throughput phase per mode (default 3s)
	BodySize    int           // response body bytes (default 1024)
	// BackendDelay makes the stand-in app take this long per request, as a
	// real app does; 0 measures the proxy's own cost (CPU-bound loopback).
	BackendDelay time.Duration
}

// BenchStats is one mode's result.
type BenchStats struct {
	Mode     string
	P50, P99 time.Duration
	RPS      float64
	Errors   int64
}

// BenchResult compares direct requests to a plain HTTP backend on
// loopback with the same requests through the endpoint proxy (TLS
// terminated, token checked, Backend consulted).
type BenchResult struct {
	Opts  BenchOptions
	Modes []BenchStats // [0] is direct
}

func (r BenchResult) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "proxy benchmark: %d sequential requests, %d clients for %s, %d-byte bodies, app delay %s\n",
		r.Opts.Requests, r.Opts.Concurrency, r.Opts.Duration, r.Opts.BodySize, r.Opts.BackendDelay)
	fmt.Fprintf(&b, "%-28s %10s %10s %12s %8s %12s %12s\n", "mode", "p50", "p99", "req/s", "errors", "added p50", "throughput")
	d := r.Modes[0]
	for _, m := range r.Modes {
		fmt.Fprintf(&b, "%-28s %10s %10s %12.0f %8d %12s %11.0f%%\n", m.Mode,
			m.P50.Round(time.Microsecond), m.P99.Round(time.Microsecond), m.RPS, m.Errors,
			(m.P50 - d.P50).Round(time.Microsecond), 100*m.RPS/d.RPS)
	}
	for _, m := range r.Modes {
		if !strings.HasPrefix(m.Mode, "proxy") {
			continue
		}
		ok := func(b bool) string {
			if b {
				return "met"
			}
			return "NOT met"
		}
		fmt.Fprintf(&b, "%s vs %s: added p50 %s (target < 1ms: %s), throughput %.0f%% (target >= 70%%: %s)\n", m.Mode, d.Mode,
			(m.P50 - d.P50).Round(time.Microsecond), ok(m.P50-d.P50 < time.Millisecond), 100*m.RPS/d.RPS, ok(m.RPS >= 0.7*d.RPS))
	}
	return b.String()
}

type staticBackend struct{ tgt Target }

func (b staticBackend) Lookup(context.Context, string) (Target, error) { return b.tgt, nil }
func (staticBackend) EnsureRunning(context.Context, string) error      { return nil }
func (staticBackend) ConnOpened(string)                                {}
func (staticBackend) ConnClosed(string)                                {}

// Bench measures the proxy's added latency and its throughput against a
// plain backend, all on loopback in this process. It is what `kiln bench
// proxy` prints.
func Bench(ctx context.Context, o BenchOptions) (BenchResult, error) {
	if o.Requests <= 0 {
		o.Requests = 2000
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Duration <= 0 {
		o.Duration = 3 * time.Second
	}
	if o.BodySize <= 0 {
		o.BodySize = 1024
	}
	res := BenchResult{Opts: o}
	body := []byte(strings.Repeat("k", o.BodySize))
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o.BackendDelay > 0 {
			time.Sleep(o.BackendDelay)
		}
		w.Write(body)
	})}
	go backend.Serve(backendLn)
	defer backend.Close()

	dir, err := os.MkdirTemp("", "kiln-bench-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	const dom = "bench.localhost"
	ca, err := tlsca.Open(tlsca.Config{Domain: dom, Dir: filepath.Join(dir, "tls")})
	if err != nil {
		return res, err
	}
	// The same app behind its own TLS: the fair baseline for the proxy's
	// one extra hop, since a client of the proxy pays for TLS anyway.
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	backendTLS := &http.Server{Handler: backend.Handler}
	go backendTLS.Serve(tls.NewListener(tlsLn, ca.TLSConfig()))
	defer backendTLS.Close()
	// A bare reverse proxy (TLS in, HTTP out, nothing else): the floor of
	// what any proxy in Go costs here, to tell the proxy's own overhead
	// from the price of the extra hop.
	bareLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	bareRP := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: backendLn.Addr().String()})
	bareRP.Transport = &http.Transport{MaxIdleConns: 1024, MaxIdleConnsPerHost: 256}
	bare := &http.Server{Handler: bareRP}
	go bare.Serve(tls.NewListener(bareLn, ca.TLSConfig()))
	defer bare.Close()
	key := make([]byte, 32)
	rand.Read(key)
	signer, _ := token.NewSigner(key)
	tok, _, err := signer.Mint("bench", "vm", token.KindEndpoint, []token.PortRange{token.Port(DefaultPort)}, 10*time.Minute)
	if err != nil {
		return res, err
	}
	var d net.Dialer
	srv, err := New(Config{Domain: dom, Backend: staticBackend{Target{Addr: netip.MustParseAddr("127.0.0.1"), Ingress: true}},
		Tokens: signer, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, backendLn.Addr().String())
		}})
	if err != nil {
		return res, err
	}
	proxyLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	pctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { srv.Serve(pctx, proxyLn, ca.TLSConfig(), time.Second); close(done) }()
	defer func() { stop(); <-done }()

	roots := x509.NewCertPool()
	roots.AddCert(ca.Leaf()) // the leaf's issuer is our CA; trust the CA
	roots.AppendCertsFromPEM(ca.CAPEM())
	viaTLS := func(addr string, h2 bool) *http.Client {
		tc := &tls.Config{RootCAs: roots}
		if !h2 {
			tc.NextProtos = []string{"http/1.1"}
		}
		return &http.Client{Transport: &http.Transport{
			TLSClientConfig: tc, ForceAttemptHTTP2: h2, MaxIdleConnsPerHost: o.Concurrency,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return d.DialContext(ctx, network, addr)
			}}}
	}
	proxied := func(h2 bool) *http.Client { return viaTLS(proxyLn.Addr().String(), h2) }
	modes := []struct {
		name   string
		client *http.Client
		url    string
		hdr    http.Header
	}{
		{"direct http/1.1", &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: o.Concurrency}},
			"http://" + backendLn.Addr().String() + "/", nil},
		{"direct https http/1.1", viaTLS(tlsLn.Addr().String(), false), "https://vm." + dom + "/", nil},
		{"bare Go proxy https http/1.1", viaTLS(bareLn.Addr().String(), false), "https://vm." + dom + "/", nil},
		{"proxy https http/1.1", proxied(false), "https://vm." + dom + "/", http.Header{HeaderAuth: {tok}}},
		{"proxy https h2", proxied(true), "https://vm." + dom + "/", http.Header{HeaderAuth: {tok}}},
	}
	for _, m := range modes {
		do := func() error {
			req, _ := http.NewRequestWithContext(ctx, "GET", m.url, nil)
			for k, v := range m.hdr {
				req.Header[k] = v
			}
			resp, err := m.client.Do(req)
			if err != nil {
				return err
			}
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || n != int64(o.BodySize) {
				return fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
			}
			return nil
		}
		st := BenchStats{Mode: m.name}
		for i := 0; i < 100; i++ { // warm up connections and caches
			if err := do(); err != nil {
				return res, fmt.Errorf("%s warm-up: %w", m.name, err)
			}
		}
		lat := make([]time.Duration, 0, o.Requests)
		for i := 0; i < o.Requests; i++ {
			t0 := time.Now()
			if err := do(); err != nil {
				st.Errors++
				continue
			}
			lat = append(lat, time.Since(t0))
		}
		slices.Sort(lat)
		if len(lat) > 0 {
			st.P50, st.P99 = lat[len(lat)/2], lat[len(lat)*99/100]
		}
		var count, errs atomic.Int64
		deadline := time.Now().Add(o.Duration)
		var wg sync.WaitGroup
		t0 := time.Now()
		for w := 0; w < o.Concurrency; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) && ctx.Err() == nil {
					if do() != nil {
						errs.Add(1)
					} else {
						count.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		st.RPS = float64(count.Load()) / time.Since(t0).Seconds()
		st.Errors += errs.Load()
		m.client.CloseIdleConnections()
		res.Modes = append(res.Modes, st)
		if err := ctx.Err(); err != nil {
			return res, err
		}
	}
	return res, nil
}
