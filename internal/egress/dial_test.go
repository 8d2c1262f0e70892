package egress

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// serve starts an HTTP server on addr ("127.0.0.2:0" …) and counts its
// requests.
func serve(t *testing.T, addr string, h http.HandlerFunc) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	var n atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		h(w, r)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), &n
}

func secret(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "host secret") }

func get(t *testing.T, c *http.Client, url string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func TestClientRefusesLoopback(t *testing.T) {
	addr, hits := serve(t, "127.0.0.1:0", secret)
	c := (&Policy{}).Client(5 * time.Second)
	body, err := get(t, c, "http://"+addr+"/secret")
	if !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("got %q, %v; want not allowed", body, err)
	}
	if hits.Load() != 0 {
		t.Fatal("the loopback server was contacted")
	}
	if msg := Tenant(err).Error(); msg != "fetching URL: address 127.0.0.1 is not allowed: kiln does not fetch from private, loopback, link-local or the host's own addresses" {
		t.Fatalf("tenant message %q", msg)
	}
}

func TestClientRefusesRedirect(t *testing.T) {
	denied, hits := serve(t, "127.0.0.1:0", secret)
	allowed, _ := serve(t, "127.0.0.2:0", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+denied+"/secret", http.StatusFound)
	})
	p := &Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}
	c := p.Client(5 * time.Second)
	body, err := get(t, c, "http://"+allowed+"/start")
	if !errors.Is(err, ErrNotAllowed) || !strings.Contains(err.Error(), "address 127.0.0.1 is not allowed") {
		t.Fatalf("got %q, %v; want not allowed", body, err)
	}
	if hits.Load() != 0 {
		t.Fatal("the redirect target was contacted")
	}
	// The allowed server itself works (so the refusal above is the hop).
	ok, _ := serve(t, "127.0.0.2:0", secret)
	if body, err := get(t, c, "http://"+ok+"/"); err != nil || body != "host secret" {
		t.Fatalf("allowed server: %q, %v", body, err)
	}
}

// TestDialerChecksResolvedAddress: a name is checked by what it resolves
// to at connect time, whatever the name looks like (DNS rebinding).
func TestDialerChecksResolvedAddress(t *testing.T) {
	target, hits := serve(t, "127.0.0.1:0", secret)
	_, port, _ := net.SplitHostPort(target)
	dnsAddr := fakeDNS(t, map[string]string{"rebind.test.": "127.0.0.1", "public.test.": "127.0.0.2"})
	d := (&Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}).Dialer(2 * time.Second)
	d.Resolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, dnsAddr)
	}}
	_, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("rebind.test", port))
	if !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("rebind.test: %v, want not allowed", err)
	}
	if hits.Load() != 0 {
		t.Fatal("connected")
	}
	// The allowed answer gets through the check (nothing listens there on
	// that port, so the kernel refuses: proof the dial was attempted).
	_, err = d.DialContext(context.Background(), "tcp", net.JoinHostPort("public.test", port))
	if err == nil || errors.Is(err, ErrNotAllowed) {
		t.Fatalf("public.test: %v, want a real connect error", err)
	}
}

func fakeDNS(t *testing.T, answers map[string]string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		if a, ok := answers[q.Name]; ok && q.Qtype == dns.TypeA {
			rr, _ := dns.NewRR(q.Name + " 0 IN A " + a)
			m.Answer = append(m.Answer, rr)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

// TestTransportIgnoresProxyEnv: HTTP_PROXY would hand the connection to a
// proxy beyond the check; the transport never uses it.
func TestTransportIgnoresProxyEnv(t *testing.T) {
	proxy, proxyHits := serve(t, "127.0.0.3:0", secret)
	t.Setenv("HTTP_PROXY", "http://"+proxy)
	t.Setenv("http_proxy", "http://"+proxy)
	target, hits := serve(t, "127.0.0.1:0", secret)
	c := (&Policy{}).Client(5 * time.Second)
	if _, err := get(t, c, "http://"+target+"/"); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("err = %v, want not allowed", err)
	}
	if proxyHits.Load() != 0 || hits.Load() != 0 {
		t.Fatalf("proxy hits %d, target hits %d", proxyHits.Load(), hits.Load())
	}
}

// TestTransportTrusted: an operator-named endpoint (--insecure-registry)
// is reached on loopback; another port of the same host is not.
func TestTransportTrusted(t *testing.T) {
	reg, _ := serve(t, "127.0.0.1:0", secret)
	other, otherHits := serve(t, "127.0.0.1:0", secret)
	c := &http.Client{Transport: (&Policy{}).Transport(TransportOptions{Trusted: []string{reg}})}
	if body, err := get(t, c, "http://"+reg+"/v2/"); err != nil || body != "host secret" {
		t.Fatalf("trusted: %q, %v", body, err)
	}
	if _, err := get(t, c, "http://"+other+"/v2/"); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("untrusted port: %v", err)
	}
	if otherHits.Load() != 0 {
		t.Fatal("untrusted port contacted")
	}
}

func TestControlRefusesUDP(t *testing.T) {
	if err := (&Policy{HostAddrs: noHost}).Control("udp", "1.1.1.1:53", nil); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("udp: %v", err)
	}
}
