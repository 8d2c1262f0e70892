package dnsfwd

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// upstream is a real DNS server on loopback standing in for the host's
// resolver.
func upstream(t *testing.T) string {
	t.Helper()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		q := r.Question[0]
		m := new(dns.Msg)
		m.SetReply(r)
		switch {
		case q.Name == "slow.test.":
			time.Sleep(3 * time.Second)
			return
		case q.Qtype == dns.TypeA:
			rr, _ := dns.NewRR(q.Name + " 60 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		case q.Qtype == dns.TypeTXT:
			for i := 0; i < 20; i++ {
				rr, _ := dns.NewRR(q.Name + ` 60 IN TXT "` + strings.Repeat("x", 200) + `"`)
				m.Answer = append(m.Answer, rr)
			}
		}
		// Like a real resolver: truncate what does not fit a UDP answer.
		if _, ok := w.RemoteAddr().(*net.UDPAddr); ok {
			size := 512
			if o := r.IsEdns0(); o != nil {
				size = int(o.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	us := &dns.Server{PacketConn: pc, Handler: h}
	ts := &dns.Server{Listener: ln, Handler: h}
	go us.ActivateAndServe()
	go ts.ActivateAndServe()
	t.Cleanup(func() { us.Shutdown(); ts.Shutdown() })
	return pc.LocalAddr().String()
}

func query(t *testing.T, netw, addr, name string, qtype uint16, edns bool) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(1232, false)
	}
	c := &dns.Client{Net: netw, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("exchange %s %s: %v", netw, name, err)
	}
	return r
}

func TestForward(t *testing.T) {
	up := upstream(t)
	f, err := startTest(t, Config{ID: "t", Listen: "127.0.0.1:0", Client: loopback, Upstreams: []string{up}, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	addr := f.Addr().String()
	tests := []struct {
		name      string
		netw      string
		qname     string
		qtype     uint16
		edns      bool
		rcode     int
		truncated bool
		minAns    int
	}{
		{"A over udp", "udp", "vm.test.", dns.TypeA, false, dns.RcodeSuccess, false, 1},
		{"A over tcp", "tcp", "vm.test.", dns.TypeA, false, dns.RcodeSuccess, false, 1},
		{"big answer truncated on udp", "udp", "big.test.", dns.TypeTXT, false, dns.RcodeSuccess, true, 0},
		{"big answer edns still truncated", "udp", "big.test.", dns.TypeTXT, true, dns.RcodeSuccess, true, 0},
		{"big answer whole on tcp", "tcp", "big.test.", dns.TypeTXT, false, dns.RcodeSuccess, false, 20},
		{"zone transfer refused", "tcp", "vm.test.", dns.TypeAXFR, false, dns.RcodeRefused, false, 0},
		{"upstream timeout servfail", "udp", "slow.test.", dns.TypeA, false, dns.RcodeServerFailure, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			r := query(t, tc.netw, addr, tc.qname, tc.qtype, tc.edns)
			if r.Rcode != tc.rcode || r.Truncated != tc.truncated || len(r.Answer) < tc.minAns {
				t.Fatalf("rcode=%d tc=%v answers=%d; want %d %v >=%d", r.Rcode, r.Truncated, len(r.Answer), tc.rcode, tc.truncated, tc.minAns)
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("took %s", time.Since(start))
			}
		})
	}
}

func TestRateLimit(t *testing.T) {
	up := upstream(t)
	f, err := startTest(t, Config{ID: "t", Listen: "127.0.0.1:0", Client: loopback, Upstreams: []string{up}, QPS: 0.001, Burst: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 5; i++ {
		r := query(t, "udp", f.Addr().String(), "vm.test.", dns.TypeA, false)
		want := dns.RcodeSuccess
		if i >= 3 {
			want = dns.RcodeRefused
		}
		if r.Rcode != want {
			t.Fatalf("query %d: rcode %d, want %d", i, r.Rcode, want)
		}
	}
	if f.Limited.Load() != 2 {
		t.Fatalf("limited = %d", f.Limited.Load())
	}
}

func TestHostResolvers(t *testing.T) {
	p := t.TempDir() + "/resolv.conf"
	os.WriteFile(p, []byte("search x\nnameserver 10.255.255.53\nnameserver 192.0.2.1\n"), 0o644)
	got, err := HostResolvers(p)
	if err != nil || strings.Join(got, ",") != "10.255.255.53:53,192.0.2.1:53" {
		t.Fatalf("got %v, %v", got, err)
	}
}

var loopback = netip.MustParseAddr("127.0.0.1")

// startTest starts a forwarder on a free port. The forwarder takes the
// UDP port first and the same TCP port after it, which another process on
// a busy test host may hold: a few tries on other ports.
func startTest(t *testing.T, cfg Config) (*Forwarder, error) {
	t.Helper()
	for i := 0; ; i++ {
		f, err := Start(context.Background(), cfg)
		if err == nil || i == 4 || !errors.Is(err, syscall.EADDRINUSE) {
			return f, err
		}
	}
}

// TestOnlyClientAnswered: a forwarder whose guest is 127.0.0.2 answers
// queries from 127.0.0.2 and drops, unanswered, those from 127.0.0.1, over
// UDP and TCP.
func TestOnlyClientAnswered(t *testing.T) {
	up := upstream(t)
	f, err := startTest(t, Config{ID: "t", Listen: "127.0.0.1:0", Client: netip.MustParseAddr("127.0.0.2"), Upstreams: []string{up}})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, netw := range []string{"udp", "tcp"} {
		t.Run(netw, func(t *testing.T) {
			ask := func(src string) (*dns.Msg, error) {
				var la net.Addr = &net.UDPAddr{IP: net.ParseIP(src)}
				if netw == "tcp" {
					la = &net.TCPAddr{IP: net.ParseIP(src)}
				}
				c := &dns.Client{Net: netw, Timeout: 700 * time.Millisecond, Dialer: &net.Dialer{LocalAddr: la, Timeout: time.Second}}
				m := new(dns.Msg)
				m.SetQuestion("vm.test.", dns.TypeA)
				r, _, err := c.Exchange(m, f.Addr().String())
				return r, err
			}
			if r, err := ask("127.0.0.2"); err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("from the guest: %v, %v", r, err)
			}
			before := f.Refused.Load()
			if r, err := ask("127.0.0.1"); err == nil {
				t.Fatalf("answered a query from another address: %v", r)
			}
			if f.Refused.Load() != before+1 {
				t.Fatalf("refused = %d, want %d", f.Refused.Load(), before+1)
			}
		})
	}
}

// TestOnAnswer: the hook hears the name asked and the answer's IPv4
// addresses before the guest has the answer.
func TestOnAnswer(t *testing.T) {
	up := upstream(t)
	type heard struct {
		name  string
		addrs []netip.Addr
		ttl   time.Duration
	}
	got := make(chan heard, 4)
	f, err := startTest(t, Config{ID: "t", Listen: "127.0.0.1:0", Client: loopback, Upstreams: []string{up},
		OnAnswer: func(name string, addrs []netip.Addr, ttl time.Duration) { got <- heard{name, addrs, ttl} }})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	query(t, "udp", f.Addr().String(), "Api.Example.TEST.", dns.TypeA, false)
	select {
	case h := <-got:
		if h.name != "api.example.test" || len(h.addrs) != 1 || h.addrs[0] != netip.MustParseAddr("192.0.2.7") || h.ttl != time.Minute {
			t.Fatalf("heard %+v", h)
		}
	default:
		t.Fatal("the guest had its answer before the hook heard it")
	}
	query(t, "udp", f.Addr().String(), "big.test.", dns.TypeTXT, false)
	select {
	case h := <-got:
		t.Fatalf("an answer without addresses was reported: %+v", h)
	default:
	}
}
