//go:build linux

package netns_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/netns/netnstest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

func needRoot(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "network namespaces")
}

func testID(tag string) string {
	b := make([]byte, 3)
	rand.Read(b)
	return "t" + tag + hex.EncodeToString(b)
}

// hostTableCleanup removes the host table at the end of the test only if
// the test created it, so a developer's running VMs keep theirs.
func hostTableCleanup(t *testing.T) {
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tabs, _ := c.ListTablesOfFamily(nftables.TableFamilyINet)
	for _, tb := range tabs {
		if tb.Name == netns.TableName {
			return
		}
	}
	t.Cleanup(func() {
		if err := netns.RemoveHostRules(); err != nil {
			t.Errorf("removing host table: %v", err)
		}
	})
}

func setupVM(t *testing.T, cfg netns.Config) *netns.Net {
	t.Helper()
	n, err := netns.Setup(context.Background(), cfg)
	t.Cleanup(func() { _ = netns.Teardown(context.Background(), cfg.ID) })
	if err != nil {
		t.Fatalf("setup %s: %v", cfg.ID, err)
	}
	return n
}

// internet makes a stand-in for the internet: a namespace behind a host
// link with an address of 192.88.99.0/24 (the deprecated 6to4 relay
// anycast block: globally reachable, so not on the deny list, and no one's
// unicast host), routed by the host to that link only. It returns the
// address of a server there.
func internet(t *testing.T, tag string) string {
	path := network(t, tag, "192.88.99")
	netnstest.ServeTCP(t, path, "192.88.99.1:9000", "internet")
	return "192.88.99.1:9000"
}

// network makes a namespace behind a host link on NET.0/24 (NET is the
// first three octets): the host end is NET.254, the namespace's NET.1.
// It returns the namespace's path.
func network(t *testing.T, tag, net24 string) string {
	path := netnstest.NewNS(t, "kilntest-inet-"+tag, nil)
	ns, err := vnetns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	hostName := "ktin" + tag[len(tag)-6:]
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}, PeerName: "eth0",
		PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostName); err == nil {
			netlink.LinkDel(l)
		}
	})
	must := func(err error) {
		if err != nil {
			t.Helper()
			t.Fatal(err)
		}
	}
	hl, err := netlink.LinkByName(hostName)
	must(err)
	must(netlink.AddrAdd(hl, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(net24 + ".254"), Mask: net.CIDRMask(24, 32)}}))
	must(netlink.LinkSetUp(hl))
	nl, err := netlink.NewHandleAt(ns)
	must(err)
	defer nl.Close()
	il, err := nl.LinkByName("eth0")
	must(err)
	must(nl.AddrAdd(il, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(net24 + ".1"), Mask: net.CIDRMask(24, 32)}}))
	must(nl.LinkSetUp(il))
	return path
}

func TestIsolation(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	idA, idB := testID("a"), testID("b")
	a := setupVM(t, netns.Config{ID: idA, Egress: false})
	// B's network is made in a spare namespace (as for a clone pool's
	// reserved process): the same rules must hold there.
	b := setupVM(t, netns.Config{ID: idB, Egress: true, Spare: newSpare(t)})
	if a.HostAddr == b.HostAddr {
		t.Fatalf("both VMs got %s", a.HostAddr)
	}
	const gport = 8080
	gA, gB := netnstest.StartGuest(t, a), netnstest.StartGuest(t, b)
	gA.ServeTCP(t, gport, "guest-A")
	gB.ServeTCP(t, gport, "guest-B")
	inet := internet(t, idA)

	hostLn := netnstest.Listen(t, "", "0.0.0.0:0")
	defer hostLn.Close()
	go func() {
		for {
			c, err := hostLn.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("host"))
			c.Close()
		}
	}()
	hostPort := hostLn.Addr().(*net.TCPAddr).Port
	// Something on the gateway's DNS port inside each VM ns, as dnsfwd will
	// be (TCP is enough to see the input policy), and on another port.
	netnstest.ServeTCP(t, a.NSPath, "172.30.0.1:53", "dns-A")
	netnstest.ServeTCP(t, b.NSPath, "172.30.0.1:53", "dns-B")
	netnstest.ServeTCP(t, b.NSPath, "172.30.0.1:22", "gw-ssh")
	// The metadata service (internal/imds) listens inside each VM ns.
	netnstest.ServeTCP(t, a.NSPath, "169.254.169.254:80", "imds-A")
	netnstest.ServeTCP(t, b.NSPath, "169.254.169.254:80", "imds-B")
	netnstest.ServeTCP(t, b.NSPath, "169.254.169.254:81", "imds-other-port")

	hp := func(a netip.Addr, p int) string { return netip.AddrPortFrom(a, uint16(p)).String() }
	hostEth := firstGlobalHostAddr(t)
	tests := []dialCase{
		// The guest sees the gateway as the client: host addresses stay hidden.
		{"host reaches guest A via DNAT", "", a.GuestDial(gport), "guest-A from 172.30.0.1"},
		{"host reaches guest B via DNAT", "", b.GuestDial(gport), "guest-B from 172.30.0.1"},
		{"no-egress: not host veth", gA.NSPath, hp(a.HostPeer, hostPort), ""},
		{"no-egress: not host address", gA.NSPath, hp(hostEth, hostPort), ""},
		{"no-egress: not other VM", gA.NSPath, b.GuestDial(gport), ""},
		{"no-egress: not internet", gA.NSPath, inet, ""},
		{"no-egress: no DNS", gA.NSPath, "172.30.0.1:53", ""},
		{"egress: internet, masqueraded", gB.NSPath, inet, "internet from 192.88.99.254"},
		{"egress: DNS at gateway", gB.NSPath, "172.30.0.1:53", "dns-B from 172.30.0.2"},
		{"egress: not gateway ssh", gB.NSPath, "172.30.0.1:22", ""},
		{"egress: not host veth", gB.NSPath, hp(b.HostPeer, hostPort), ""},
		{"egress: not host address", gB.NSPath, hp(hostEth, hostPort), ""},
		{"egress: not other VM", gB.NSPath, a.GuestDial(gport), ""},
		{"egress: not other VM host link", gB.NSPath, hp(a.HostPeer, hostPort), ""},
		{"egress: not host resolver net", gB.NSPath, "10.255.255.53:53", ""},
		// 169.254.169.254:80 is answered inside the VM's own namespace
		// (with or without egress); nothing else link-local is reached.
		{"no-egress: own metadata service", gA.NSPath, "169.254.169.254:80", "imds-A from 172.30.0.2"},
		{"egress: own metadata service", gB.NSPath, "169.254.169.254:80", "imds-B from 172.30.0.2"},
		{"egress: not metadata other port", gB.NSPath, "169.254.169.254:81", ""},
		{"egress: not other link-local", gB.NSPath, "169.254.169.253:80", ""},
	}
	// Without HostDialer's mark (any local user) the host cannot reach a
	// guest: only the endpoint proxy may.
	t.Run("host without the mark is refused", func(t *testing.T) {
		t.Parallel()
		c, err := net.DialTimeout("tcp4", a.GuestDial(gport), 700*time.Millisecond)
		if err == nil {
			c.Close()
			t.Fatal("an unmarked host connection reached guest A")
		}
	})
	checkDials(t, tests)
}

func firstGlobalHostAddr(t *testing.T) netip.Addr {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP.To4())
		if !ip.IsLoopback() && !netns.DefaultPool.Contains(ip) && !strings.HasPrefix(ip.String(), "192.88.99.") {
			return ip
		}
	}
	t.Skip("no host address")
	return netip.Addr{}
}

func newSpare(t *testing.T) *os.File {
	t.Helper()
	f, err := netns.NewSpare()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestSpare: a VM network made in a spare namespace is that namespace,
// with the TAP made ahead (its MAC and address kept), and goes away as
// any other; the host's own namespace is refused as a spare.
func TestSpare(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	host, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	if _, err := netns.Setup(context.Background(), netns.Config{ID: testID("sh"), Spare: host}); !errors.Is(err, netns.ErrInvalid) {
		t.Fatalf("setup in the host's namespace: %v, want ErrInvalid", err)
	}
	spare := newSpare(t)
	id := testID("sp")
	n := setupVM(t, netns.Config{ID: id, Spare: spare})
	var a, b unix.Stat_t
	if err := unix.Stat(n.NSPath, &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(int(spare.Fd()), &b); err != nil {
		t.Fatal(err)
	}
	if a.Ino != b.Ino || a.Dev != b.Dev {
		t.Fatal("the VM namespace is not the spare")
	}
	nsh, err := vnetns.GetFromPath(n.NSPath)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	nl, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	tap, err := nl.LinkByName(netns.TapName)
	if err != nil || tap.Attrs().HardwareAddr.String() != netns.GatewayMAC.String() || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("tap = %v (%v), want up with MAC %s", tap, err, netns.GatewayMAC)
	}
	addrs, _ := nl.AddrList(tap, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IP.String() != netns.GatewayAddr.String() {
		t.Fatalf("tap addresses %v, want %s", addrs, netns.GatewayAddr)
	}
	if err := n.Teardown(context.Background()); err != nil {
		t.Fatal(err)
	}
	netnstest.AssertGone(t, id)
}

func TestTeardownIdempotent(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	id := testID("td")
	n := setupVM(t, netns.Config{ID: id, Egress: true})
	if _, err := netns.Setup(context.Background(), netns.Config{ID: id}); !errors.Is(err, netns.ErrExists) {
		t.Fatalf("second setup: %v, want ErrExists", err)
	}
	o, err := netns.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if o.HostAddr != n.HostAddr || !o.Egress || o.NSPath != n.NSPath {
		t.Fatalf("open = %+v, want %+v", o, n)
	}
	// Every TAP carries the fixed gateway MAC (snapshot ARP caches stay valid).
	nsh, err := vnetns.GetFromPath(n.NSPath)
	if err != nil {
		t.Fatal(err)
	}
	nl, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	tap, err := nl.LinkByName(n.Tap)
	nl.Close()
	nsh.Close()
	if err != nil || tap.Attrs().HardwareAddr.String() != netns.GatewayMAC.String() {
		t.Fatalf("tap mac = %v (%v), want %s", tap, err, netns.GatewayMAC)
	}
	// A QEMU holding the TAP open must not stop teardown.
	netnstest.StartGuest(t, n)
	for i := 0; i < 2; i++ {
		if err := n.Teardown(context.Background()); err != nil {
			t.Fatalf("teardown %d: %v", i, err)
		}
	}
	netnstest.AssertGone(t, id)
	if _, err := netns.Open(context.Background(), id); !errors.Is(err, netns.ErrNotFound) {
		t.Fatalf("open after teardown: %v", err)
	}
}

func TestReconcile(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	keepID, goneID, nsOnly, linkOnly := testID("k"), testID("g"), testID("n"), testID("l")
	setupVM(t, netns.Config{ID: keepID})
	setupVM(t, netns.Config{ID: goneID, Egress: true})
	// Half-made leftovers: a namespace without links, a host link without
	// namespace.
	t.Cleanup(func() {
		_ = netns.Teardown(context.Background(), nsOnly)
		_ = netns.Teardown(context.Background(), linkOnly)
	})
	netnstest.NewNS(t, netns.NSPrefix+nsOnly, nil)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: netns.HostLinkName(linkOnly)},
		PeerName: "ktpeer" + linkOnly[len(linkOnly)-6:]}); err != nil {
		t.Fatal(err)
	}
	l, _ := netlink.LinkByName(netns.HostLinkName(linkOnly))
	netlink.LinkSetAlias(l, "kiln:"+linkOnly)

	ours := map[string]bool{goneID: true, nsOnly: true, linkOnly: true}
	removed, err := netns.Reconcile(context.Background(), func(id string) bool { return !ours[id] })
	if err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	got := map[string]bool{}
	for _, id := range removed {
		got[id] = true
	}
	for id := range ours {
		if !got[id] {
			t.Errorf("reconcile did not remove %s (removed %v)", id, removed)
		}
		netnstest.AssertGone(t, id)
	}
	if _, err := netns.Open(context.Background(), keepID); err != nil {
		t.Errorf("kept VM network gone: %v", err)
	}
}

func TestSetupInvalid(t *testing.T) {
	tests := []struct {
		name string
		cfg  netns.Config
	}{
		{"empty id", netns.Config{}},
		{"slash in id", netns.Config{ID: "a/b"}},
		{"too long", netns.Config{ID: strings.Repeat("x", 65)}},
		{"v6 pool", netns.Config{ID: "x", Pool: netip.MustParsePrefix("fd00::/64")}},
		{"pool too small", netns.Config{ID: "x", Pool: netip.MustParsePrefix("10.9.0.0/30")}},
		{"invalid extra deny", netns.Config{ID: "x", ExtraDeny: []netip.Prefix{{}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := netns.Setup(context.Background(), tc.cfg); !errors.Is(err, netns.ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
}

// TestShowRules prints the rules as nft renders them (KILN_SHOW_RULES=1),
// for review; the code never runs nft.
func TestShowRules(t *testing.T) {
	needRoot(t)
	if os.Getenv("KILN_SHOW_RULES") == "" {
		t.Skip("set KILN_SHOW_RULES=1")
	}
	hostTableCleanup(t)
	n := setupVM(t, netns.Config{ID: testID("show"), Egress: true})
	for _, args := range [][]string{
		{"nft", "list", "table", "inet", "kiln"},
		{"ip", "netns", "exec", n.NSName, "nft", "list", "ruleset"},
		{"ip", "-n", n.NSName, "-br", "addr"},
		{"ip", "-n", n.NSName, "route"},
	} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		t.Logf("$ %s\n%s%v", strings.Join(args, " "), out, err)
	}
}

// BenchmarkSetupTeardown: the cost of a VM network on the RunMicrovm path.
func BenchmarkSetupTeardown(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for i := 0; i < b.N; i++ {
		id := testID("bench")
		n, err := netns.Setup(context.Background(), netns.Config{ID: id, Egress: i%2 == 0})
		if err != nil {
			netns.Teardown(context.Background(), id)
			b.Fatal(err)
		}
		if err := n.Teardown(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// TestExecInNS: a process started inside RunInNS (how the engine starts
// QEMU) lives in the VM namespace and sees the TAP.
func TestExecInNS(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	n := setupVM(t, netns.Config{ID: testID("ex")})
	cmd := exec.Command("cat", "/proc/net/dev")
	var out strings.Builder
	cmd.Stdout = &out
	if err := netns.RunInNS(n.NSPath, cmd.Start); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), n.Tap+":") || strings.Contains(out.String(), n.HostLink) {
		t.Fatalf("child not in the VM namespace:\n%s", out.String())
	}
}

// TestExtraDeny: an operator's --deny-cidr reaches the VM's egress chain.
// Two egress VMs, one internet stand-in: the VM with the extra prefix is
// refused it, the other reaches it, and an IPv6 prefix in the same list
// (for kiln's own fetches) does not break the IPv4 rules.
func TestExtraDeny(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	idA, idB := testID("xa"), testID("xb")
	deny := []netip.Prefix{netip.MustParsePrefix("192.88.99.0/28"), netip.MustParsePrefix("2001:4860::/32")}
	a := setupVM(t, netns.Config{ID: idA, Egress: true, ExtraDeny: deny})
	b := setupVM(t, netns.Config{ID: idB, Egress: true})
	gA, gB := netnstest.StartGuest(t, a), netnstest.StartGuest(t, b)
	inet := internet(t, idA)
	if got, err := netnstest.Dial(gB.NSPath, inet, 2*time.Second); err != nil || got != "internet from 192.88.99.254" {
		t.Fatalf("VM without the extra prefix: %q, %v", got, err)
	}
	if got, err := netnstest.Dial(gA.NSPath, inet, 700*time.Millisecond); err == nil {
		t.Fatalf("VM with --deny-cidr reached %s: %q", inet, got)
	}
}

// TestRPFilter: every VM namespace filters by reverse path, strictly (1),
// on all, default and each link.
func TestRPFilter(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	for _, egress := range []bool{false, true} {
		n := setupVM(t, netns.Config{ID: testID("rp"), Egress: egress})
		err := netns.RunInNS(n.NSPath, func() error {
			for _, dev := range []string{"all", "default", netns.TapName, netns.NSVethName} {
				b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/rp_filter")
				if err != nil {
					return err
				}
				if v := strings.TrimSpace(string(b)); v != "1" {
					t.Errorf("egress=%v: %s rp_filter = %s, want 1", egress, dev, v)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestRestoreHost: the first Setup records ip_forward's earlier value;
// RestoreHost leaves everything while a VM network exists and, once none
// is left, removes the host table and puts ip_forward back.
func TestRestoreHost(t *testing.T) {
	needRoot(t)
	if left, _ := filepath.Glob(filepath.Join(netns.NetnsDir, netns.NSPrefix+"*")); len(left) > 0 {
		t.Skipf("kiln VM networks exist (%d): ip_forward and the host table are in use", len(left))
	}
	orig, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile("/proc/sys/net/ipv4/ip_forward", orig, 0o644) })
	old := netns.HostStateDir
	netns.HostStateDir = t.TempDir()
	t.Cleanup(func() { netns.HostStateDir = old })
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	forward := func() string {
		b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return strings.TrimSpace(string(b))
	}
	id := testID("rh")
	n := setupVM(t, netns.Config{ID: id, Egress: true})
	if forward() != "1" {
		t.Fatal("setup did not enable forwarding")
	}
	if b, err := os.ReadFile(filepath.Join(netns.HostStateDir, "ip_forward.orig")); err != nil || strings.TrimSpace(string(b)) != "0" {
		t.Fatalf("recorded value %q, %v", b, err)
	}
	if done, err := netns.RestoreHost(); err != nil || done {
		t.Fatalf("restore with a VM network left: %v, %v", done, err)
	}
	if forward() != "1" || !hostTable(t) {
		t.Fatal("restore acted while a VM network exists")
	}
	if err := n.Teardown(context.Background()); err != nil {
		t.Fatal(err)
	}
	done, err := netns.RestoreHost()
	if err != nil {
		t.Fatal(err)
	}
	if !done {
		t.Skip("another kiln made a VM network meanwhile")
	}
	if forward() != "0" || hostTable(t) {
		t.Fatalf("after restore: ip_forward=%s, host table present=%v", forward(), hostTable(t))
	}
	if _, err := os.Stat(filepath.Join(netns.HostStateDir, "ip_forward.orig")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record left behind: %v", err)
	}
}

func hostTable(t *testing.T) bool {
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tabs, _ := c.ListTablesOfFamily(nftables.TableFamilyINet)
	for _, tb := range tabs {
		if tb.Name == netns.TableName {
			return true
		}
	}
	return false
}

// TestPackageProxyRedirect: a "mirror" answering at a documentation
// address (as this host's Debian mirror does) is out of a guest's reach,
// except that with a package proxy the guest's port-80 connections to it
// arrive at the proxy on the gateway. Before, guests reached the
// documentation ranges directly.
func TestPackageProxyRedirect(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	id, plain := testID("p"), testID("q")
	n := setupVM(t, netns.Config{ID: id, Egress: true,
		PackageProxy: &netns.Redirect{Addrs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}, Port: 3142}})
	o := setupVM(t, netns.Config{ID: plain, Egress: true})
	g, og := netnstest.StartGuest(t, n), netnstest.StartGuest(t, o)
	mirror := network(t, id, "198.51.100")
	for _, p := range []string{"80", "443", "9000"} {
		netnstest.ServeTCP(t, mirror, "198.51.100.1:"+p, "mirror:"+p)
	}
	netnstest.ServeTCP(t, n.NSPath, "172.30.0.1:3142", "proxy")
	netnstest.ServeTCP(t, o.NSPath, "172.30.0.1:3142", "proxy-o")
	// The host itself still reaches the "mirror" (as the proxy will);
	// retried while the new link comes up.
	var got string
	var err error
	for i := 0; i < 10; i++ {
		if got, err = netnstest.Dial("", "198.51.100.1:80", time.Second); err == nil {
			break
		}
	}
	if err != nil || !strings.HasPrefix(got, "mirror:80") {
		t.Fatalf("host to mirror: %q, %v", got, err)
	}
	tests := []dialCase{
		{"mirror port 80 goes to the proxy", g.NSPath, "198.51.100.1:80", "proxy from 172.30.0.2"},
		{"mirror's other ports are denied", g.NSPath, "198.51.100.1:443", ""},
		{"documentation address denied", g.NSPath, "198.51.100.1:9000", ""},
		{"without a proxy: mirror denied", og.NSPath, "198.51.100.1:80", ""},
		{"without a proxy: no proxy port", og.NSPath, "172.30.0.1:3142", ""},
	}
	checkDials(t, tests)
}

// dialCase is a connection from namespace from ("" = host) to to, and
// what the server there must answer ("" = the connection must fail).
type dialCase struct{ name, from, to, want string }

// dialWait is how long a test dial may take: a dial that must fail is
// given 700 ms (a dropped SYN is not answered), one that must succeed 5 s
// (a loaded host, or a SYN lost and sent again after 1 s).
func dialWait(reachable bool) time.Duration {
	if reachable {
		return 5 * time.Second
	}
	return 700 * time.Millisecond
}

func checkDials(t *testing.T, tests []dialCase) {
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := netnstest.Dial(tc.from, tc.to, dialWait(tc.want != ""))
			if tc.want == "" {
				if err == nil {
					t.Fatalf("reached %s (%q), want blocked", tc.to, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("dial %s = %q, %v; want %q", tc.to, got, err, tc.want)
			}
		})
	}
}

// TestEgressPolicy: a VM's own policy changes at runtime what its guest
// reaches (deny, allow over deny, cleared), and never lifts the deny list.
func TestEgressPolicy(t *testing.T) {
	needRoot(t)
	hostTableCleanup(t)
	id := testID("ep")
	n := setupVM(t, netns.Config{ID: id, Egress: true})
	g := netnstest.StartGuest(t, n)
	inet := internet(t, id)
	// A server on a documentation range (denied to every guest), routed
	// by the host like the stand-in internet.
	doc := network(t, testID("epdoc"), "198.51.100")
	netnstest.ServeTCP(t, doc, "198.51.100.1:9000", "doc")
	ok := "internet from 192.88.99.254"
	p := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, x := range s {
			out = append(out, netip.MustParsePrefix(x))
		}
		return out
	}
	for _, tc := range []struct {
		name      string
		policy    netns.EgressPolicy
		inet, doc bool // reachable
	}{
		{"no policy", netns.EgressPolicy{}, true, false},
		{"deny the destination", netns.EgressPolicy{Deny: p("192.88.99.0/24")}, false, false},
		{"deny all but allow it", netns.EgressPolicy{Allow: p("192.88.99.1/32"), Deny: p("0.0.0.0/0")}, true, false},
		{"allow another only", netns.EgressPolicy{Allow: p("8.8.8.8/32"), Deny: p("0.0.0.0/0")}, false, false},
		{"allow cannot lift the deny list", netns.EgressPolicy{Allow: p("0.0.0.0/0", "198.51.100.0/24")}, true, false},
		{"cleared", netns.EgressPolicy{}, true, false},
	} {
		if err := netns.SetEgressPolicy(context.Background(), id, tc.policy); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got, err := netnstest.Dial(g.NSPath, inet, dialWait(tc.inet))
		if reached := err == nil && got == ok; reached != tc.inet {
			t.Errorf("%s: dial %s = %q, %v; want reachable %v", tc.name, inet, got, err, tc.inet)
		}
		if got, err := netnstest.Dial(g.NSPath, "198.51.100.1:9000", dialWait(tc.doc)); (err == nil) != tc.doc {
			t.Errorf("%s: dial the documentation range = %q, %v; want reachable %v", tc.name, got, err, tc.doc)
		}
	}
	// Learned addresses (a DNS answer for an allowed domain) pass a deny
	// while the policy lets them, never past the deny list.
	// want is what the dial should find: its wait (dialWait).
	reach := func(addr string, want bool) bool {
		_, err := netnstest.Dial(g.NSPath, addr, dialWait(want))
		return err == nil
	}
	closed := netns.EgressPolicy{Deny: p("0.0.0.0/0"), AllowLearned: true}
	if err := netns.SetEgressPolicy(context.Background(), id, closed); err != nil {
		t.Fatal(err)
	}
	if reach(inet, false) {
		t.Fatal("reached the internet before its address was learned")
	}
	learn := []netip.Addr{netip.MustParseAddr("192.88.99.1"), netip.MustParseAddr("198.51.100.1")}
	if err := netns.AllowLearned(context.Background(), id, learn, time.Second); err != nil {
		t.Fatal(err)
	}
	if !reach(inet, true) || reach("198.51.100.1:9000", false) {
		t.Fatal("a learned address: want the internet reachable and the documentation range not")
	}
	if err := netns.SetEgressPolicy(context.Background(), id, netns.EgressPolicy{Deny: p("0.0.0.0/0")}); err != nil {
		t.Fatal(err)
	}
	if err := netns.SetEgressPolicy(context.Background(), id, closed); err != nil {
		t.Fatal(err)
	}
	if reach(inet, false) {
		t.Fatal("learned addresses outlived a policy without AllowLearned")
	}
	if err := netns.SetEgressPolicy(context.Background(), id, netns.EgressPolicy{Deny: p("2001:db8::/32")}); !errors.Is(err, netns.ErrInvalid) {
		t.Errorf("an IPv6 prefix: %v, want ErrInvalid", err)
	}
	noEgress := testID("epn")
	setupVM(t, netns.Config{ID: noEgress})
	if err := netns.SetEgressPolicy(context.Background(), noEgress, netns.EgressPolicy{}); !errors.Is(err, netns.ErrNotFound) {
		t.Errorf("a VM without egress: %v, want ErrNotFound", err)
	}
}

// TestNamesOutliveIPNetnsAdd: `ip netns add` bind-mounts NetnsDir onto
// itself when it is not a mount point yet, hiding every name mounted on
// the plain directory before; such a VM's namespace could then be neither
// reached nor removed (a leak seen in CI). kiln makes NetnsDir a mount
// point first, moving names mounted before onto it. The test runs in a
// mount namespace of its own, where NetnsDir starts as the plain
// directory a new host has.
func TestNamesOutliveIPNetnsAdd(t *testing.T) {
	needRoot(t)
	if os.Getenv("KILN_NETNS_PRIVATE") == "" {
		if _, err := exec.LookPath("unshare"); err != nil {
			t.Skip("unshare (util-linux) is not installed")
		}
		hostTableCleanup(t)
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", os.Args[0], "-test.run=^TestNamesOutliveIPNetnsAdd$", "-test.v")
		cmd.Env = append(os.Environ(), "KILN_NETNS_PRIVATE=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("in a mount namespace of its own: %v\n%s", err, out)
		}
		return
	}
	// Only this namespace's view: the host's NetnsDir stays as it is.
	if err := unix.Unmount(netns.NetnsDir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Fatal(err)
	}
	// A VM of a kiln from before: its name mounted on the plain directory.
	old := testID("ol")
	oldPath := filepath.Join(netns.NetnsDir, "kiln-"+old)
	if err := os.WriteFile(oldPath, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("unshare", "--net="+oldPath, "true").CombinedOutput(); err != nil {
		t.Fatalf("unshare --net: %v\n%s", err, out)
	}
	id := testID("sh")
	n := setupVM(t, netns.Config{ID: id})
	if err := netns.Teardown(context.Background(), old); err != nil {
		t.Fatalf("teardown of a namespace named before kiln made %s a mount point: %v", netns.NetnsDir, err)
	}
	if _, err := os.Stat(oldPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s is left: %v", oldPath, err)
	}
	other := "kilntest-ipadd-" + id
	if out, err := exec.Command("ip", "netns", "add", other).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	defer exec.Command("ip", "netns", "del", other).Run()
	if _, err := vnetns.GetFromPath(n.NSPath); err != nil {
		t.Fatalf("the VM's namespace is hidden after ip netns add: %v", err)
	}
	if err := n.Teardown(context.Background()); err != nil {
		t.Fatalf("teardown after ip netns add: %v", err)
	}
	netnstest.AssertGone(t, id)
}
