package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/token"
)

// TestRoutedTargetsNeverShareConnections: two microVMs whose Targets have
// the same guest address but their own Dial (two nodes behind an edge)
// each get their own guest's answers on every upstream path, with
// connections kept alive in between, and Config.Dial never sees a route.
func TestRoutedTargetsNeverShareConnections(t *testing.T) {
	var configDials atomic.Int32
	e := newEnvWith(t, func(c *Config) {
		inner := c.Dial
		c.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			configDials.Add(1)
			return inner(ctx, network, addr)
		}
	})
	lo := netip.MustParseAddr("127.0.0.1")
	dials := map[string]*atomic.Int32{}
	for _, vm := range []string{"ra", "rb"} {
		// Port 8080 plain (h1 and h2c), 8443 TLS: both answer the VM's name.
		ports := map[uint16]string{8080: guest(t, "guest-"+vm, true)}
		tg := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode(map[string]any{"guest": "guest-" + vm})
		}))
		t.Cleanup(tg.Close)
		ports[8443] = tg.Listener.Addr().String()
		n := &atomic.Int32{}
		dials[vm] = n
		e.backend.vms[vm] = &fakeVM{tgt: Target{Account: "acct", Addr: lo, Ingress: true, Route: "node-" + vm + "/" + vm,
			Dial: func(ctx context.Context, port uint16) (net.Conn, error) {
				addr, ok := ports[port]
				if !ok {
					return nil, fmt.Errorf("dialled port %d", port)
				}
				n.Add(1)
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			}}}
	}
	h1 := &http.Client{Transport: e.transport(false), Timeout: 10 * time.Second}
	modes := map[string]func(vm string) *http.Request{
		"h1 fast path": func(vm string) *http.Request {
			r, _ := http.NewRequest("GET", "https://"+vm+"."+domain+"/", nil)
			return r
		},
		"with a body": func(vm string) *http.Request {
			r, _ := http.NewRequest("POST", "https://"+vm+"."+domain+"/", strings.NewReader("x"))
			return r
		},
		"h2c": func(vm string) *http.Request {
			r, _ := http.NewRequest("GET", "https://"+vm+"."+domain+"/", nil)
			r.Header.Set(HeaderForceH2, "true")
			return r
		},
		"tls guest": func(vm string) *http.Request {
			r, _ := http.NewRequest("GET", "https://"+vm+"."+domain+"/", nil)
			r.Header.Set(HeaderPort, "8443")
			return r
		},
	}
	const rounds = 10
	before := configDials.Load()
	for i := range rounds {
		for name, mk := range modes {
			for _, vm := range []string{"ra", "rb"} {
				req := mk(vm)
				req.Header.Set(HeaderAuth, e.mint(t, "acct", vm, token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Minute))
				client := e.client
				if i%2 == 0 {
					client = h1
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatalf("%s %s: %v", name, vm, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var got map[string]any
				json.Unmarshal(body, &got)
				if resp.StatusCode != 200 || got["guest"] != "guest-"+vm {
					t.Fatalf("%s round %d: a request for %s was answered by %v (status %d)", name, i, vm, got["guest"], resp.StatusCode)
				}
			}
		}
	}
	if n := configDials.Load() - before; n != 0 {
		t.Errorf("Config.Dial was called %d times for routed targets", n)
	}
	for vm, n := range dials {
		// Two TLS probes, the fast path's pool, the two plain Transports'
		// and the TLS one's (once per client protocol at most).
		if got := n.Load(); got > 10 {
			t.Errorf("%s: %d dials for %d requests: connections are not pooled", vm, got, rounds*len(modes))
		}
		t.Logf("%s: %d tunnel dials for %d requests", vm, n.Load(), rounds*len(modes))
	}
}

// TestRouteHostNeedsItsRequest: a pool that held a route host could only
// dial it again with the request that named it.
func TestRouteHostNeedsItsRequest(t *testing.T) {
	s, err := New(Config{Domain: domain, Backend: &fakeBackend{}, Tokens: &token.Signer{},
		Dial: func(context.Context, string, string) (net.Conn, error) {
			t.Error("Config.Dial reached")
			return nil, io.EOF
		}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := routeHost("node-1/vm-a", 80), routeHost("node-1/vm-b", 80)
	if a == b || routeHost("node-1/vm-a", 81) == a {
		t.Fatal("route hosts collide")
	}
	if _, err := s.dial(context.Background(), "tcp", a); err == nil {
		t.Error("dialled a route host without its request")
	}
	ctx := context.WithValue(context.Background(), keyRoute, &routeDial{host: b, port: 80,
		dial: func(context.Context, uint16) (net.Conn, error) { t.Error("dialled vm-b for vm-a"); return nil, io.EOF }})
	if _, err := s.dial(ctx, "tcp", a); err == nil {
		t.Error("dialled route a with route b's request")
	}
}

func TestConnectorAccess(t *testing.T) {
	const arn = "arn:aws:lambda:us-east-1:aws:network-connector:"
	for _, c := range []struct {
		list           []string
		ingress, shell bool
	}{
		{nil, true, false},
		{[]string{arn + connAllIngress}, true, false},
		{[]string{arn + "aws-network-connector:NO_INGRESS"}, false, false},
		{[]string{arn + connShellIngress}, false, true},
		{[]string{arn + connAllIngress, arn + connShellIngress}, true, true},
		{[]string{"aws-network-connector:ALL_INGRESS"}, false, false}, // not an ARN's last part
	} {
		if in, sh := ConnectorAccess(c.list); in != c.ingress || sh != c.shell {
			t.Errorf("%v: ingress %v shell %v, want %v %v", c.list, in, sh, c.ingress, c.shell)
		}
	}
}
