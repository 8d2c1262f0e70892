package egress

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

func noHost() ([]netip.Addr, error) { return nil, nil }

func TestCheck(t *testing.T) {
	own := netip.MustParseAddr("93.184.0.10")
	p := &Policy{
		ExtraDeny: []netip.Prefix{netip.MustParsePrefix("8.8.4.0/24"), netip.MustParsePrefix("2606:4700::/32")},
		Allow:     []netip.Prefix{netip.MustParsePrefix("10.9.9.0/24")},
		HostAddrs: func() ([]netip.Addr, error) { return []netip.Addr{own, netip.MustParseAddr("2a01:4f8::5")}, nil },
	}
	tests := []struct {
		addr    string
		allowed bool
	}{
		{"0.0.0.0", false},
		{"0.1.2.3", false},
		{"10.0.0.1", false},
		{"10.255.255.53", false},
		{"100.64.0.1", false},
		{"100.100.100.200", false}, // Alibaba metadata
		{"100.127.255.255", false},
		{"100.128.0.1", true},
		{"127.0.0.1", false},
		{"127.1.2.3", false},
		{"169.254.169.254", false},
		{"169.254.170.2", false}, // ECS task metadata
		{"172.16.0.1", false},
		{"172.31.255.255", false},
		{"172.32.0.1", true},
		{"192.0.0.192", false}, // Oracle metadata
		{"192.0.2.1", false},
		{"192.88.99.1", true}, // deprecated anycast, globally reachable
		{"192.168.1.1", false},
		{"198.18.0.1", false},
		{"198.19.255.255", false},
		{"198.51.100.7", false},
		{"203.0.113.9", false},
		{"224.0.0.1", false},
		{"239.255.255.250", false},
		{"240.0.0.1", false},
		{"255.255.255.255", false},
		{"168.63.129.16", false}, // Azure wire server
		{"168.63.129.17", true},
		{"1.1.1.1", true},
		{"8.8.8.8", true},
		{"8.8.4.4", false}, // extra deny
		{"10.9.9.9", true}, // allow wins over the private range
		{"93.184.0.10", false},
		{"93.184.0.11", true},
		// IPv6.
		{"::", false},
		{"::1", false},
		{"::127.0.0.1", false},
		{"::ffff:127.0.0.1", false},
		{"::ffff:169.254.169.254", false},
		{"::ffff:8.8.8.8", true},
		{"::ffff:10.9.9.9", true},
		{"64:ff9b::a9fe:a9fe", false},
		{"64:ff9b:1::1", false},
		{"100::1", false},
		{"2001::1", false}, // Teredo
		{"2001:2::1", false},
		{"2001:db8::1", false},
		{"2002:7f00:1::1", false}, // 6to4 of 127.0.0.1
		{"3fff::1", false},
		{"5f00::1", false},
		{"fc00::1", false},
		{"fd00:ec2::254", false}, // AWS metadata over IPv6
		{"fe80::1", false},
		{"fe80::1%eth0", false},
		{"fec0::1", false},
		{"ff02::1", false},
		{"2606:4700::1111", false}, // extra deny
		{"2606:4701::1", true},
		{"2a01:4f8::5", false}, // host's own
		{"2a00:1450:4001::1", true},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			err := p.Check(netip.MustParseAddr(tt.addr))
			if tt.allowed {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrNotAllowed) || !errors.Is(err, errdefs.ErrInvalid) {
				t.Fatalf("err = %v, want not allowed", err)
			}
			if !strings.Contains(err.Error(), "is not allowed: kiln does not fetch from private, loopback, link-local or the host's own addresses") {
				t.Fatalf("message %q", err)
			}
		})
	}
}

func TestCheckZeroPolicyUsesInterfaces(t *testing.T) {
	own, err := InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var p *Policy // nil and zero value both work
	for _, a := range own {
		if err := p.Check(a); err == nil {
			t.Errorf("host address %s allowed", a)
		}
	}
	if err := p.Check(netip.MustParseAddr("1.1.1.1")); err != nil && !isOwn(own, "1.1.1.1") {
		t.Errorf("1.1.1.1: %v", err)
	}
}

func isOwn(own []netip.Addr, s string) bool {
	for _, a := range own {
		if a.String() == s {
			return true
		}
	}
	return false
}

func TestCheckHostAddrsError(t *testing.T) {
	p := &Policy{HostAddrs: func() ([]netip.Addr, error) { return nil, errors.New("netlink broke") }}
	if err := p.Check(netip.MustParseAddr("1.1.1.1")); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("err = %v, want refused when the host's addresses are unknown", err)
	}
}

func TestIPv4(t *testing.T) {
	v4 := IPv4(Denied())
	for _, p := range v4 {
		if !p.Addr().Is4() {
			t.Fatalf("%s in IPv4 list", p)
		}
	}
	has := func(s string) bool {
		for _, p := range v4 {
			if p == netip.MustParsePrefix(s) {
				return true
			}
		}
		return false
	}
	for _, s := range []string{"10.0.0.0/8", "169.254.0.0/16", "168.63.129.16/32", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10"} {
		if !has(s) {
			t.Errorf("%s missing", s)
		}
	}
	if len(v4) == len(Denied()) {
		t.Error("IPv4 kept IPv6 prefixes")
	}
}

func TestParseCIDRs(t *testing.T) {
	got, err := ParseCIDRs([]string{"10.1.2.3/16", "192.0.2.5", "2001:db8::/48"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.1.0.0/16", "192.0.2.5/32", "2001:db8::/48"}
	for i, p := range got {
		if p.String() != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	for _, bad := range []string{"", "10.0.0.0/33", "example.com", "10.0.0.0/8,"} {
		if _, err := ParseCIDRs([]string{bad}); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%q: err = %v", bad, err)
		}
	}
}

func TestTenant(t *testing.T) {
	inner := &NotAllowedError{Addr: netip.MustParseAddr("127.0.0.1")}
	wrapped := errors.Join(errors.New(`Get "http://127.0.0.1:9/x": dial tcp 127.0.0.1:9`), inner)
	got := Tenant(wrapped).Error()
	want := "fetching URL: address 127.0.0.1 is not allowed: kiln does not fetch from private, loopback, link-local or the host's own addresses"
	if got != want {
		t.Fatalf("got %q\nwant %q", got, want)
	}
	other := errors.New("connection refused")
	if Tenant(other) != other {
		t.Fatal("other errors changed")
	}
}

// FuzzControl feeds Control the address strings a resolver could hand a
// dialer: it must not panic, and the mapped and plain forms of one IPv4
// address must get the same answer.
func FuzzControl(f *testing.F) {
	for _, s := range []string{"127.0.0.1:80", "[::ffff:127.0.0.1]:80", "[fe80::1%eth0]:443", "1.1.1.1:443", "[::]:0", "bogus", "", "[64:ff9b::a9fe:a9fe]:80"} {
		f.Add(s)
	}
	p := &Policy{HostAddrs: noHost}
	f.Fuzz(func(t *testing.T, s string) {
		err := p.Control("tcp", s, nil)
		ap, perr := netip.ParseAddrPort(s)
		if perr != nil {
			if err == nil {
				t.Fatalf("unparsable %q allowed", s)
			}
			return
		}
		a := ap.Addr().WithZone("")
		if a.Is4() {
			m := netip.AddrFrom16(a.As16())
			if (p.Check(m) == nil) != (err == nil) {
				t.Fatalf("%s and %s disagree", a, m)
			}
		}
	})
}
