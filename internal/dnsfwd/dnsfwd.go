// Package dnsfwd runs one DNS forwarder per microVM at the guest's gateway
// (172.30.0.1:53, UDP and TCP). It listens inside the VM's network
// namespace but sends upstream queries from the host namespace, to the
// resolvers in the host's /etc/resolv.conf. That matters here: the host
// resolver sits on a 10/8 address the guest may never reach directly.
//
// Guests are untrusted, so every VM gets a query rate limit, a cap on
// queries in flight, bounded message sizes and upstream timeouts; zone
// transfers are refused. Only the guest's own address is answered: a
// query from any other source gets no reply at all (no reflection, no
// resolver for whatever else reaches the gateway).
package dnsfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/kiln-sandbox/kiln/internal/netns"
)

// Defaults, chosen for interactive sandboxes: generous for package
// managers, far below what could be used to flood the host resolver.
const (
	DefaultListen      = "172.30.0.1:53"
	DefaultQPS         = 200
	DefaultBurst       = 400
	DefaultMaxInflight = 64
	DefaultTimeout     = 2 * time.Second
	// maxUDPResponse is what we answer over UDP to clients without EDNS0
	// (RFC 1035); with EDNS0 we honour up to 1232 (DNS flag day 2020).
	maxUDPResponse = 512
	maxEDNSUDP     = 1232
)

// ErrInvalid reports a bad config.
var ErrInvalid = errors.New("invalid dns forwarder config")

// Config for one VM's forwarder.
type Config struct {
	// ID is the microVM id (for logs).
	ID string
	// NSPath is the VM's network namespace (netns.Net.NSPath). Empty:
	// listen in the current namespace (tests).
	NSPath string
	// Listen is the address to serve on; default 172.30.0.1:53.
	Listen string
	// Upstreams are "ip:port" resolvers; default: the host's resolv.conf.
	Upstreams []string
	// Client is the only source address answered; zero = netns.GuestAddr.
	Client netip.Addr
	// QPS and Burst: the VM's token bucket. MaxInflight: concurrent
	// upstream queries. Timeout: per upstream attempt.
	QPS         float64
	Burst       int
	MaxInflight int
	Timeout     time.Duration
	// OnAnswer, if set, is told the IPv4 addresses of every upstream
	// answer (the A records, CNAME targets followed within the answer)
	// with the name the guest asked (lowercase, no trailing dot) and the
	// answer's smallest TTL, before the guest gets the answer: what it
	// does (open those addresses to the guest) is in place when the guest
	// connects.
	OnAnswer func(name string, addrs []netip.Addr, ttl time.Duration)
}

// Forwarder is a running forwarder; Close stops it.
type Forwarder struct {
	cfg      Config
	udp, tcp *dns.Server
	pc       net.PacketConn
	ln       net.Listener
	bucket   *bucket
	inflight chan struct{}
	client   *dns.Client
	tcpCli   *dns.Client
	next     atomic.Uint32
	closeOne sync.Once
	// Stats for tests and metrics. Refused counts queries dropped because
	// they came from an address other than Config.Client.
	Served, Limited, Failed, Refused atomic.Int64
}

// HostResolvers returns "ip:port" for each nameserver in a resolv.conf.
func HostResolvers(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	var out []string
	for _, s := range cc.Servers {
		out = append(out, net.JoinHostPort(s, cc.Port))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no nameserver in %s: %w", path, ErrInvalid)
	}
	return out, nil
}

// Start opens the listening sockets (inside cfg.NSPath via netns.RunInNS) and
// serves until Close. The sockets keep their namespace; everything else
// (upstream sockets included) runs in the host namespace.
func Start(ctx context.Context, cfg Config) (*Forwarder, error) {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if !cfg.Client.IsValid() {
		cfg.Client = netns.GuestAddr
	}
	if len(cfg.Upstreams) == 0 {
		ups, err := HostResolvers("/etc/resolv.conf")
		if err != nil {
			return nil, err
		}
		cfg.Upstreams = ups
	}
	if cfg.QPS <= 0 {
		cfg.QPS = DefaultQPS
	}
	if cfg.Burst <= 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = DefaultMaxInflight
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f := &Forwarder{
		cfg:      cfg,
		bucket:   newBucket(cfg.QPS, cfg.Burst),
		inflight: make(chan struct{}, cfg.MaxInflight),
		// UDPSize only sizes the read buffer: accept whatever the upstream sends.
		client: &dns.Client{Net: "udp", Timeout: cfg.Timeout, UDPSize: dns.MaxMsgSize},
		tcpCli: &dns.Client{Net: "tcp", Timeout: cfg.Timeout},
	}
	listen := func() error {
		var err error
		if f.pc, err = net.ListenPacket("udp4", cfg.Listen); err != nil {
			return err
		}
		// Same port for TCP, also when the config asked for port 0 (tests).
		tcpAddr := cfg.Listen
		if host, port, _ := net.SplitHostPort(cfg.Listen); port == "0" {
			tcpAddr = net.JoinHostPort(host, fmt.Sprint(f.pc.LocalAddr().(*net.UDPAddr).Port))
		}
		if f.ln, err = net.Listen("tcp4", tcpAddr); err != nil {
			f.pc.Close()
			return err
		}
		return nil
	}
	var err error
	if cfg.NSPath != "" {
		err = netns.RunInNS(cfg.NSPath, listen)
	} else {
		err = listen()
	}
	if err != nil {
		return nil, fmt.Errorf("dns forwarder listening on %s: %w", cfg.Listen, err)
	}
	h := dns.HandlerFunc(f.serve)
	f.udp = &dns.Server{PacketConn: f.pc, Handler: h}
	f.tcp = &dns.Server{Listener: f.ln, Handler: h,
		ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second,
		IdleTimeout: func() time.Duration { return 10 * time.Second }, MaxTCPQueries: 128}
	for _, s := range []*dns.Server{f.udp, f.tcp} {
		started := make(chan struct{})
		s.NotifyStartedFunc = func() { close(started) }
		go func(s *dns.Server) {
			if err := s.ActivateAndServe(); err != nil {
				slog.Debug("dnsfwd: server stopped", "microvm", cfg.ID, "err", err)
			}
		}(s)
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			f.Close()
			return nil, fmt.Errorf("dns forwarder did not start")
		}
	}
	slog.Debug("dnsfwd: serving", "microvm", cfg.ID, "listen", cfg.Listen, "upstreams", cfg.Upstreams)
	return f, nil
}

// Addr is the UDP listening address.
func (f *Forwarder) Addr() net.Addr { return f.pc.LocalAddr() }

// Close stops serving and closes the sockets; safe to call twice.
func (f *Forwarder) Close() error {
	f.closeOne.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		f.udp.ShutdownContext(ctx)
		f.tcp.ShutdownContext(ctx)
		f.pc.Close()
		f.ln.Close()
	})
	return nil
}

func (f *Forwarder) serve(w dns.ResponseWriter, req *dns.Msg) {
	defer w.Close()
	if !f.fromClient(w.RemoteAddr()) {
		f.Refused.Add(1)
		return
	}
	reply := func(rcode int) {
		m := new(dns.Msg)
		m.SetRcode(req, rcode)
		w.WriteMsg(m)
	}
	if req.Response || req.Opcode != dns.OpcodeQuery || len(req.Question) != 1 {
		reply(dns.RcodeFormatError)
		return
	}
	switch req.Question[0].Qtype {
	case dns.TypeAXFR, dns.TypeIXFR:
		reply(dns.RcodeRefused)
		return
	}
	if !f.bucket.take() {
		f.Limited.Add(1)
		reply(dns.RcodeRefused)
		return
	}
	select {
	case f.inflight <- struct{}{}:
		defer func() { <-f.inflight }()
	default:
		f.Limited.Add(1)
		reply(dns.RcodeServerFailure)
		return
	}
	_, isUDP := w.RemoteAddr().(*net.UDPAddr)
	resp, err := f.forward(req, !isUDP)
	if err != nil {
		f.Failed.Add(1)
		slog.Debug("dnsfwd: upstream failed", "microvm", f.cfg.ID, "q", req.Question[0].Name, "err", err)
		reply(dns.RcodeServerFailure)
		return
	}
	resp.Id = req.Id
	if f.cfg.OnAnswer != nil {
		if addrs, ttl := answerAddrs(resp); len(addrs) > 0 {
			f.cfg.OnAnswer(strings.ToLower(strings.TrimSuffix(req.Question[0].Name, ".")), addrs, ttl)
		}
	}
	if isUDP {
		size := maxUDPResponse
		if o := req.IsEdns0(); o != nil {
			size = min(max(int(o.UDPSize()), maxUDPResponse), maxEDNSUDP)
		}
		resp.Truncate(size)
	}
	f.Served.Add(1)
	w.WriteMsg(resp)
}

// maxAnswerAddrs bounds the addresses one answer reports.
const maxAnswerAddrs = 64

// answerAddrs returns the IPv4 addresses of an answer's A records and the
// smallest TTL of the records.
func answerAddrs(resp *dns.Msg) ([]netip.Addr, time.Duration) {
	var out []netip.Addr
	ttl := uint32(0)
	first := true
	for _, rr := range resp.Answer {
		h := rr.Header()
		if first || h.Ttl < ttl {
			ttl, first = h.Ttl, false
		}
		if a, ok := rr.(*dns.A); ok && len(out) < maxAnswerAddrs {
			if x, ok := netip.AddrFromSlice(a.A.To4()); ok {
				out = append(out, x)
			}
		}
	}
	return out, time.Duration(ttl) * time.Second
}

// fromClient reports whether a query came from the guest's own address.
func (f *Forwarder) fromClient(a net.Addr) bool {
	var ip net.IP
	switch v := a.(type) {
	case *net.UDPAddr:
		ip = v.IP
	case *net.TCPAddr:
		ip = v.IP
	}
	x, ok := netip.AddrFromSlice(ip)
	return ok && x.Unmap() == f.cfg.Client
}

// forward tries each upstream once, starting round-robin; over TCP when
// the guest asked over TCP, else over UDP, retrying over TCP when the
// upstream truncated.
func (f *Forwarder) forward(req *dns.Msg, overTCP bool) (*dns.Msg, error) {
	q := req.Copy()
	var errs []error
	n := len(f.cfg.Upstreams)
	start := int(f.next.Add(1)) % n
	for i := 0; i < n; i++ {
		up := f.cfg.Upstreams[(start+i)%n]
		ctx, cancel := context.WithTimeout(context.Background(), f.cfg.Timeout)
		cli := f.client
		if overTCP {
			cli = f.tcpCli
		}
		resp, _, err := cli.ExchangeContext(ctx, q, up)
		if err == nil && resp.Truncated && !overTCP {
			resp, _, err = f.tcpCli.ExchangeContext(ctx, q, up)
		}
		cancel()
		if err == nil {
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", up, err))
	}
	return nil, errors.Join(errs...)
}

// bucket is a token bucket: rate tokens per second up to burst.
type bucket struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newBucket(rate float64, burst int) *bucket {
	return &bucket{rate: rate, burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

func (b *bucket) take() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
