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

// TestBench runs a short benchmark and prints the table; set
// KILN_BENCH_FULL=1 for the default (longer) sizes.
func TestBench(t *testing.T) {
	o := BenchOptions{Requests: 300, Concurrency: 8, Duration: 500 * time.Millisecond}
	if os.Getenv("KILN_BENCH_FULL") != "" {
		o = BenchOptions{}
	}
	for _, delay := range []time.Duration{0, 2 * time.Millisecond} {
		o.BackendDelay = delay
		r, err := Bench(context.Background(), o)
		if err != nil {
			t.Fatal(err)
		}
		t.Log("\n" + r.String())
		for _, m := range r.Modes {
			if m.Errors != 0 {
				t.Errorf("%s: %d errors", m.Mode, m.Errors)
			}
		}
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
