package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"time"
)

// Control is a net.Dialer.Control that refuses, before connect(2), any
// destination the policy denies. It sees the resolved address of each
// attempt, so every A/AAAA answer and every redirect hop is checked.
func (p *Policy) Control(network, address string, _ syscall.RawConn) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return fmt.Errorf("network %s: %w", network, ErrNotAllowed)
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("address %q: %w", address, ErrNotAllowed)
	}
	return p.Check(ap.Addr())
}

// Dialer returns a dialer that obeys the policy.
func (p *Policy) Dialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second, Control: p.Control}
}

// TransportOptions tune Transport.
type TransportOptions struct {
	// Trusted are operator-named endpoints ("host:port", or "host" for any
	// port; --insecure-registry) dialed without the policy, because the
	// operator said so: a registry on loopback, say. The match is on the
	// name the client dials, before DNS; a redirect elsewhere is checked
	// again.
	Trusted []string
	// DialTimeout bounds one connection attempt; 0 = 30s.
	DialTimeout time.Duration
}

// Transport returns an http.Transport that dials only through the policy
// and ignores HTTP(S)_PROXY from the environment: a proxy would make the
// connection, out of reach of the address check.
func (p *Policy) Transport(o TransportOptions) *http.Transport {
	to := o.DialTimeout
	if to <= 0 {
		to = 30 * time.Second
	}
	guarded := p.Dialer(to)
	plain := &net.Dialer{Timeout: to, KeepAlive: 30 * time.Second}
	trusted := map[string]bool{}
	for _, t := range o.Trusted {
		trusted[strings.ToLower(t)] = true
	}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		a := strings.ToLower(addr)
		host, _, _ := net.SplitHostPort(a)
		if trusted[a] || (host != "" && (trusted[host] || trusted["["+host+"]"])) {
			return plain.DialContext(ctx, network, addr)
		}
		return guarded.DialContext(ctx, network, addr)
	}
	return &http.Transport{
		Proxy:                  nil,
		DialContext:            dial,
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           16,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    15 * time.Second,
		ResponseHeaderTimeout:  60 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 1 << 20,
	}
}

// maxRedirects bounds a redirect chain (net/http's default is 10).
const maxRedirects = 5

// Client returns an HTTP client for tenant fetches: the policy's
// Transport, at most maxRedirects redirects (each hop dialed through the
// policy) and timeout for the whole exchange (0 = none; callers bound
// with ctx).
func (p *Policy) Client(timeout time.Duration) *http.Client {
	return &http.Client{
		Transport: p.Transport(TransportOptions{}),
		Timeout:   timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= maxRedirects {
				return fmt.Errorf("stopped after %d redirects", maxRedirects)
			}
			if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
				return errors.New("redirect to a scheme other than http or https")
			}
			return nil
		},
	}
}
