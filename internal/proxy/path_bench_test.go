//go:build linux

package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// BenchmarkProxyPath is the request path of `kiln bench proxy` (TLS,
// token check, the h1 or h2 loop, h1Upstream) in this process, for
// allocations per request and quick before/after comparisons that the
// noisy loopback benchmark cannot resolve. Client and app allocate
// too: compare runs, not absolute figures.
func BenchmarkProxyPath(b *testing.B) {
	body := []byte(strings.Repeat("k", 1024))
	jsonBody := `{"cmd":"ls","args":["-l","/tmp"],"env":{"A":"1"},"cwd":"/home/user","timeout":30,"stdin":"` + strings.Repeat("x", 120) + `"}`
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write(body)
	})}
	go app.Serve(appLn)
	defer app.Close()
	const dom = "bench.localhost"
	tlsDir := filepath.Join(b.TempDir(), "tls")
	ca, err := tlsca.Open(tlsca.Config{Domain: dom, Dir: tlsDir})
	if err != nil {
		b.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	signer, _ := token.NewSigner(key)
	tok, _, err := signer.Mint("bench", "vm", token.KindEndpoint, []token.PortRange{token.Port(DefaultPort)}, 10*time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	addr, stop, err := startBenchProxy(context.Background(), benchProxyConfig{Domain: dom, TLSDir: tlsDir, Backend: appLn.Addr().String(), Key: key})
	if err != nil {
		b.Fatal(err)
	}
	defer stop()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CAPEM())
	for _, h2 := range []bool{false, true} {
		name := "h1"
		tc := &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}}
		if h2 {
			name, tc.NextProtos = "h2", nil
		}
		var d net.Dialer
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: h2, MaxIdleConnsPerHost: 64,
			DisableCompression: true, DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return d.DialContext(ctx, network, addr)
			}}}
		do := func(b *testing.B, method string) {
			var reqBody io.Reader
			if method == http.MethodPost {
				reqBody = strings.NewReader(jsonBody)
			}
			req, _ := http.NewRequest(method, "https://vm."+dom+"/", reqBody)
			req.Header.Set(HeaderAuth, tok)
			resp, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || n != int64(len(body)) {
				b.Fatalf("status %d, %d bytes", resp.StatusCode, n)
			}
		}
		b.Run(name+"/sequential", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				do(b, http.MethodGet)
			}
		})
		// An agent's small JSON call (the direct path's body).
		b.Run(name+"/post", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				do(b, http.MethodPost)
			}
		})
		b.Run(name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					do(b, http.MethodGet)
				}
			})
		})
		client.CloseIdleConnections()
	}
}
