// Package egress is kiln's one list of destinations that nothing a tenant
// controls may reach, and the dialer and HTTP client that enforce it for
// fetches kiln makes on a tenant's behalf (Dockerfile ADD <url>, http(s)
// code artifact URIs, registry pulls for FROM).
//
// The same list feeds the nftables egress rules of every VM namespace
// (internal/netns), so a guest and kiln acting for that guest's owner are
// refused the same addresses.
//
// The check runs in net.Dialer.Control, on the address the socket is about
// to connect to: after DNS, on every connection a client opens, redirects
// included. A name that resolves to a public address once and to
// 127.0.0.1 the next time (DNS rebinding) is refused the second time.
package egress

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// denied is the built-in list: every IANA special-purpose block that is not
// globally reachable (RFC 6890 and its registry), multicast, and the cloud
// metadata services that sit on public addresses. Blocks that embed an IPv4
// address in IPv6 (NAT64, 6to4, Teredo, IPv4-compatible) are denied whole:
// they could carry any of the IPv4 blocks above through a translator.
// IPv4-mapped IPv6 (::ffff:a.b.c.d) is not listed: Check judges it as the
// IPv4 address it maps.
var denied = []netip.Prefix{
	// IPv4.
	netip.MustParsePrefix("0.0.0.0/8"),        // "this network"
	netip.MustParsePrefix("10.0.0.0/8"),       // private
	netip.MustParsePrefix("100.64.0.0/10"),    // shared (CGNAT); Alibaba metadata 100.100.100.200
	netip.MustParsePrefix("127.0.0.0/8"),      // loopback
	netip.MustParsePrefix("169.254.0.0/16"),   // link-local; AWS/GCP/Azure metadata 169.254.169.254
	netip.MustParsePrefix("172.16.0.0/12"),    // private
	netip.MustParsePrefix("192.0.0.0/24"),     // IETF protocol assignments; Oracle metadata 192.0.0.192
	netip.MustParsePrefix("192.0.2.0/24"),     // documentation (TEST-NET-1)
	netip.MustParsePrefix("192.168.0.0/16"),   // private
	netip.MustParsePrefix("198.18.0.0/15"),    // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"),  // documentation (TEST-NET-2)
	netip.MustParsePrefix("203.0.113.0/24"),   // documentation (TEST-NET-3)
	netip.MustParsePrefix("224.0.0.0/4"),      // multicast
	netip.MustParsePrefix("240.0.0.0/4"),      // reserved, and broadcast 255.255.255.255
	netip.MustParsePrefix("168.63.129.16/32"), // Azure wire server (a public address)
	// IPv6.
	netip.MustParsePrefix("::/96"),          // unspecified, loopback, IPv4-compatible
	netip.MustParsePrefix("64:ff9b::/96"),   // NAT64 well-known prefix
	netip.MustParsePrefix("64:ff9b:1::/48"), // NAT64 local use
	netip.MustParsePrefix("100::/64"),       // discard-only
	netip.MustParsePrefix("2001::/23"),      // IETF protocol assignments, Teredo 2001::/32, benchmarking
	netip.MustParsePrefix("2001:db8::/32"),  // documentation
	netip.MustParsePrefix("2002::/16"),      // 6to4
	netip.MustParsePrefix("3fff::/20"),      // documentation (RFC 9637)
	netip.MustParsePrefix("5f00::/16"),      // SRv6 SIDs
	netip.MustParsePrefix("fc00::/7"),       // unique local; AWS metadata fd00:ec2::254
	netip.MustParsePrefix("fe80::/10"),      // link-local
	netip.MustParsePrefix("fec0::/10"),      // site-local (deprecated)
	netip.MustParsePrefix("ff00::/8"),       // multicast
}

// Denied returns a copy of the built-in deny list, IPv4 and IPv6.
func Denied() []netip.Prefix { return slices.Clone(denied) }

// IPv4 returns the IPv4 prefixes of ps (what nftables rules need: kiln
// never forwards IPv6 from a guest).
func IPv4(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is4() {
			out = append(out, p.Masked())
		}
	}
	return out
}

// ErrNotAllowed is matched (errors.Is) by every refusal of this package.
// It is an errdefs.ErrInvalid: the tenant named a destination kiln will
// not contact.
var ErrNotAllowed = fmt.Errorf("address not allowed: %w", errdefs.ErrInvalid)

// NotAllowedError names the refused address. Its message says why and
// never what (if anything) listens there.
type NotAllowedError struct{ Addr netip.Addr }

func (e *NotAllowedError) Error() string {
	return fmt.Sprintf("address %s is not allowed: kiln does not fetch from private, loopback, link-local or the host's own addresses", e.Addr)
}

// Is makes errors.Is(err, ErrNotAllowed) and errors.Is(err,
// errdefs.ErrInvalid) hold.
func (e *NotAllowedError) Is(target error) bool {
	return target == ErrNotAllowed || target == errdefs.ErrInvalid
}

// Tenant turns a fetch error into what a tenant may see: a refusal by the
// policy becomes "fetching URL: address X is not allowed: ...", without
// the dial details around it; any other error is returned unchanged.
func Tenant(err error) error {
	var na *NotAllowedError
	if errors.As(err, &na) {
		return fmt.Errorf("fetching URL: %w", na)
	}
	return err
}

// Policy decides which addresses kiln may connect to for a tenant. The
// zero value is the built-in list plus the host's own addresses.
type Policy struct {
	// ExtraDeny adds operator prefixes (--deny-cidr) to the built-in list.
	ExtraDeny []netip.Prefix
	// Allow exempts prefixes from every denial (--allow-fetch-cidr), for
	// an operator's internal mirror. It applies to kiln's fetches only,
	// never to guest traffic.
	Allow []netip.Prefix
	// HostAddrs returns the host's own addresses; nil = the addresses of
	// every interface, read at each check (they change: DHCP, VM links).
	HostAddrs func() ([]netip.Addr, error)
}

// Check returns a *NotAllowedError if a may not be contacted.
func (p *Policy) Check(a netip.Addr) error {
	a = a.WithZone("")
	u := a.Unmap()
	var allow, deny []netip.Prefix
	if p != nil {
		allow, deny = p.Allow, p.ExtraDeny
	}
	for _, x := range []netip.Addr{a, u} {
		for _, pr := range allow {
			if pr.Contains(x) {
				return nil
			}
		}
	}
	if !u.IsValid() {
		return &NotAllowedError{Addr: a}
	}
	for _, x := range []netip.Addr{a, u} {
		for _, pr := range denied {
			if pr.Contains(x) {
				return &NotAllowedError{Addr: u}
			}
		}
		for _, pr := range deny {
			if pr.Contains(x) {
				return &NotAllowedError{Addr: u}
			}
		}
	}
	own, err := p.hostAddrs()
	if err != nil {
		// Not knowing the host's addresses means not knowing whether a is
		// one: refuse.
		return fmt.Errorf("listing the host's addresses: %w: %w", err, &NotAllowedError{Addr: u})
	}
	for _, h := range own {
		if h.WithZone("").Unmap() == u {
			return &NotAllowedError{Addr: u}
		}
	}
	return nil
}

func (p *Policy) hostAddrs() ([]netip.Addr, error) {
	if p != nil && p.HostAddrs != nil {
		return p.HostAddrs()
	}
	return InterfaceAddrs()
}

// InterfaceAddrs lists the addresses of every interface of the calling
// thread's network namespace.
func InterfaceAddrs() ([]netip.Addr, error) {
	as, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(as))
	for _, a := range as {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if x, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, x.Unmap())
		}
	}
	return out, nil
}

// ParseCIDRs parses operator flags ("10.1.0.0/16", or a bare address as a
// single host) into prefixes.
func ParseCIDRs(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%q is neither a CIDR prefix nor an address: %w", s, errdefs.ErrInvalid)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}
