//go:build linux

package proxy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// TestMain lets TestBench run this test binary as kiln's proxy process
// (BenchOptions.ProxyCommand), the way `kiln bench proxy` runs kiln.
func TestMain(m *testing.M) {
	if os.Getenv("KILN_BENCH_PROXY_CHILD") == "1" {
		if err := ServeBenchProxy(context.Background(), os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestBench runs a short benchmark against nginx (installed by setup.sh)
// with kiln's proxy in its own process and prints the table; set
// KILN_BENCH_FULL=1 for the default (longer) sizes.
func TestBench(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the benchmark runs nginx, which `make setup` installs")
	}
	o := BenchOptions{Rounds: 1, Requests: 200, Concurrency: 8, Duration: 300 * time.Millisecond}
	if os.Getenv("KILN_BENCH_FULL") != "" {
		o = BenchOptions{}
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("KILN_BENCH_PROXY_CHILD", "1") // the child inherits it; TestMain has run here
	o.ProxyCommand = []string{exe}
	r, err := Bench(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + r.String())
	t.Log(r.JSON())
	if !r.ProxyProcess || r.GOMAXPROCS <= 0 || r.NginxWorkers != r.GOMAXPROCS {
		t.Errorf("kiln process %v, GOMAXPROCS %d, nginx workers %d", r.ProxyProcess, r.GOMAXPROCS, r.NginxWorkers)
	}
	servers := map[string]int{}
	for _, m := range r.Modes {
		servers[m.Server]++
		if m.Errors != 0 || m.RPS <= 0 {
			t.Errorf("%s: %d errors, %.0f req/s", m.Mode, m.Errors, m.RPS)
		}
		if m.Server == "kiln" || m.Server == "nginx" {
			if m.CPUPerRequest <= 0 {
				t.Errorf("%s: no CPU time per request measured", m.Mode)
			}
			// Both proxies are measured with the same TLS on the wire.
			if want := "TLS 1.3 TLS_AES_128_GCM_SHA256 X25519 "; !strings.HasPrefix(m.TLS, want) || !strings.HasSuffix(m.TLS, m.Proto) {
				t.Errorf("%s negotiated %q, want %s%s", m.Mode, m.TLS, want, m.Proto)
			}
		}
	}
	if servers["kiln"] != 2 || servers["nginx"] != 2 || len(r.Pairs) != 2 {
		t.Errorf("modes %v, %d kiln/nginx pairs; want both protocols for both", servers, len(r.Pairs))
	}
}

// TestLoad spreads connections over 10 microVMs (fakes behind loopback
// guests) and requires zero failures.
func TestLoad(t *testing.T) {
	e := newEnv(t)
	var targets []LoadTarget
	for i := 0; i < 10; i++ {
		id := fmt.Sprintf("lvm%d", i)
		e.backend.mu.Lock()
		e.backend.vms[id] = &fakeVM{tgt: Target{Account: "acct", Addr: netip.MustParseAddr("127.0.0.1"), Ingress: true}}
		e.backend.mu.Unlock()
		targets = append(targets, LoadTarget{URL: "https://" + id + "." + domain + "/", Port: 9000,
			Token: e.mint(t, "acct", id, token.KindEndpoint, []token.PortRange{token.Port(9000)}, time.Minute)})
	}
	r, err := Load(context.Background(), LoadOptions{Targets: targets, Connections: 50, Duration: time.Second,
		Endpoint: e.addr, RootCAs: e.roots})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(r)
	if r.Failed != 0 || r.Requests == 0 {
		t.Fatalf("load: %v", r)
	}
	for _, tg := range targets {
		id := strings.TrimSuffix(strings.TrimPrefix(tg.URL, "https://"), "."+domain+"/")
		if _, open := e.backend.counts(id); open != 0 {
			t.Errorf("%s: %d connections still open", id, open)
		}
	}
}
