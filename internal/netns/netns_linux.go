//go:build linux

package netns

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/egress"
)

// mu serialises Setup/Teardown/Reconcile in this process: slot allocation
// reads the kernel's state and must not race with another Setup.
var mu sync.Mutex

// Setup creates the VM's namespace, TAP, veth pair, addresses, routes and
// nftables rules, and enables IPv4 forwarding on the host. It fails with
// ErrExists if the namespace is already there (call Open or Teardown).
// On error everything it created is removed. ctx bounds nothing long: all
// steps are local netlink calls.
func Setup(ctx context.Context, cfg Config) (*Net, error) {
	if !validID(cfg.ID) {
		return nil, fmt.Errorf("id %q: %w", cfg.ID, ErrInvalid)
	}
	if !cfg.Pool.IsValid() {
		cfg.Pool = DefaultPool
	}
	cfg.Pool = cfg.Pool.Masked()
	if !cfg.Pool.Addr().Is4() || cfg.Pool.Bits() > 29 {
		return nil, fmt.Errorf("pool %s: need an IPv4 prefix of /29 or wider: %w", cfg.Pool, ErrInvalid)
	}
	for _, p := range cfg.ExtraDeny {
		if !p.IsValid() {
			return nil, fmt.Errorf("extra deny %s: %w", p, ErrInvalid)
		}
	}
	cfg.ExtraDeny = egress.IPv4(cfg.ExtraDeny)
	if r := cfg.PackageProxy; r != nil {
		if !cfg.Egress {
			return nil, fmt.Errorf("a package proxy needs egress: %w", ErrInvalid)
		}
		if r.Port == 0 || r.Port == 53 {
			return nil, fmt.Errorf("package proxy port %d: %w", r.Port, ErrInvalid)
		}
		var v4 []netip.Addr
		for _, a := range r.Addrs {
			if a = a.Unmap(); a.Is4() {
				v4 = append(v4, a)
			}
		}
		cfg.PackageProxy = &Redirect{Addrs: v4, Port: r.Port}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()

	n := &Net{
		ID:       cfg.ID,
		Egress:   cfg.Egress,
		NSName:   NSPrefix + cfg.ID,
		Tap:      TapName,
		HostLink: HostLinkName(cfg.ID),
	}
	n.NSPath = filepath.Join(NetnsDir, n.NSName)
	if _, err := os.Stat(n.NSPath); err == nil {
		return nil, fmt.Errorf("namespace %s: %w", n.NSPath, ErrExists)
	}
	// Shared with other kiln processes' Setups; RestoreHost takes it
	// exclusively, so it never removes the host table between this
	// ensureHost and the link that marks this VM as present.
	unlock, err := lockHost(unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := ensureHost(); err != nil {
		return nil, err
	}
	hostPeer, nsAddr, err := allocate(cfg.Pool)
	if err != nil {
		return nil, err
	}
	n.HostPeer, n.HostAddr = hostPeer, nsAddr

	ok := false
	defer func() {
		if !ok {
			if err := teardownLocked(n.ID); err != nil {
				slog.Warn("netns: cleanup after failed setup", "microvm", n.ID, "err", err)
			}
		}
	}()

	// Inside the new namespace: sysctls first (so links created later inherit
	// disable_ipv6), then the TAP (its ioctl works in the thread's namespace).
	if cfg.Spare != nil {
		// Made ahead (NewSpare): only its name is new.
		err = mountNamed(n.NSName, cfg.Spare)
	} else {
		err = createNamed(n.NSName, func() error { return nsBase(cfg.TapOwner) })
	}
	if err != nil {
		return nil, fmt.Errorf("creating namespace %s: %w", n.NSName, err)
	}

	nsh, err := vnetns.GetFromPath(n.NSPath)
	if err != nil {
		return nil, fmt.Errorf("opening namespace: %w", err)
	}
	defer nsh.Close()
	nl, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in namespace: %w", err)
	}
	defer nl.Close()

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: n.HostLink},
		PeerName:      NSVethName,
		PeerNamespace: netlink.NsFd(int(nsh)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("creating veth %s: %w", n.HostLink, err)
	}
	host, err := netlink.LinkByName(n.HostLink)
	if err != nil {
		return nil, fmt.Errorf("finding veth %s: %w", n.HostLink, err)
	}
	if err := netlink.LinkSetAlias(host, aliasPrefix+n.ID); err != nil {
		return nil, fmt.Errorf("setting alias: %w", err)
	}
	// The host end needs no IPv6: nothing v6 is forwarded to or from VMs.
	_ = writeSysctl("net/ipv6/conf/"+n.HostLink+"/disable_ipv6", "1")
	if err := netlink.AddrAdd(host, addr30(n.HostPeer)); err != nil {
		return nil, fmt.Errorf("host veth address: %w", err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return nil, fmt.Errorf("host veth up: %w", err)
	}

	var steps []nsStep
	if cfg.Spare == nil {
		steps = nsLinkSteps(nl)
	}
	for _, step := range append(steps, []nsStep{
		{"veth address", func() error { return linkAddr(nl, NSVethName, addr30(n.HostAddr)) }},
		{"veth up", func() error { return linkUp(nl, NSVethName) }},
		{"default route", func() error {
			l, err := nl.LinkByName(NSVethName)
			if err != nil {
				return err
			}
			return nl.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.IP(n.HostPeer.AsSlice())})
		}},
		{"nftables", func() error { return writeVMTable(int(nsh), n, cfg) }},
	}...) {
		if err := step.fn(); err != nil {
			return nil, fmt.Errorf("namespace %s: %s: %w", n.NSName, step.name, err)
		}
	}
	ok = true
	slog.Info("netns: vm network ready", "microvm", n.ID, "ns", n.NSPath, "host_addr", n.HostAddr, "egress", n.Egress)
	return n, nil
}

// nsSysctls are every VM namespace's settings, written before its links
// exist so that they inherit disable_ipv6.
var nsSysctls = [][2]string{
	{"net/ipv4/ip_forward", "1"},
	// Strict reverse-path filtering: a packet is taken only on the
	// link its source routes back through, so the guest cannot
	// send as the gateway, the host link or anyone else.
	{"net/ipv4/conf/all/rp_filter", "1"},
	{"net/ipv4/conf/default/rp_filter", "1"},
	{"net/ipv6/conf/all/disable_ipv6", "1"},
	{"net/ipv6/conf/default/disable_ipv6", "1"},
}

// nsBase runs inside a new VM namespace: its sysctls, then its TAP (whose
// ioctl works in the thread's namespace).
func nsBase(tapOwner uint32) error {
	for _, kv := range nsSysctls {
		if err := writeSysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: TapName},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI,
		Owner:     tapOwner,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("creating tap: %w", err)
	}
	for _, f := range tap.Fds {
		f.Close() // persistent device; QEMU opens it by name
	}
	return nil
}

type nsStep struct {
	name string
	fn   func() error
}

// nsLinkSteps configure what every VM namespace has whatever its VM: the
// loopback, the TAP as the guest's gateway, the metadata address.
func nsLinkSteps(nl *netlink.Handle) []nsStep {
	return []nsStep{
		{"lo up", func() error { return linkUp(nl, "lo") }},
		{"tap mac", func() error {
			l, err := nl.LinkByName(TapName)
			if err != nil {
				return err
			}
			return nl.LinkSetHardwareAddr(l, GatewayMAC)
		}},
		{"tap address", func() error { return linkAddr(nl, TapName, addr30(GatewayAddr)) }},
		{"tap up", func() error { return linkUp(nl, TapName) }},
		// The metadata service (internal/imds) answers at MetadataAddr
		// from inside this namespace: a local address, so the guest's
		// packets to it are delivered here and never forwarded (the
		// egress deny list still drops 169.254.0.0/16 for forwarding).
		{"metadata address", func() error {
			return linkAddr(nl, "lo", &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(MetadataAddr.AsSlice()), Mask: net.CIDRMask(32, 32)}})
		}},
	}
}

// Open finds an existing VM network (for example after `kiln server`
// restarted while the VM kept running). Egress is read back from the VM's
// nftables table.
func Open(ctx context.Context, id string) (*Net, error) {
	if !validID(id) {
		return nil, fmt.Errorf("id %q: %w", id, ErrInvalid)
	}
	n := &Net{ID: id, NSName: NSPrefix + id, Tap: TapName, HostLink: HostLinkName(id)}
	n.NSPath = filepath.Join(NetnsDir, n.NSName)
	if _, err := os.Stat(n.NSPath); err != nil {
		return nil, fmt.Errorf("namespace %s: %w", n.NSName, ErrNotFound)
	}
	host, err := netlink.LinkByName(n.HostLink)
	if err != nil {
		return nil, fmt.Errorf("host link %s: %w", n.HostLink, ErrNotFound)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(host, netlink.FAMILY_V4) })
	if err != nil || len(addrs) == 0 {
		return nil, fmt.Errorf("host link %s has no address: %w", n.HostLink, ErrNotFound)
	}
	a, _ := netip.AddrFromSlice(addrs[0].IP.To4())
	n.HostPeer = a
	n.HostAddr = a.Next()
	nsh, err := vnetns.GetFromPath(n.NSPath)
	if err != nil {
		return nil, fmt.Errorf("opening namespace: %w", err)
	}
	defer nsh.Close()
	eg, err := readEgress(int(nsh))
	if err != nil {
		return nil, err
	}
	n.Egress = eg
	return n, nil
}

// SetEgressPolicy replaces the VM's own egress policy, at once and for
// connections made from now on (established ones keep going, as nftables
// lets replies of accepted connections through). ErrNotFound if the VM
// has no network with egress; the deny list stays whatever the policy.
func SetEgressPolicy(ctx context.Context, id string, p EgressPolicy) error {
	if !validID(id) {
		return fmt.Errorf("id %q: %w", id, ErrInvalid)
	}
	if err := p.Check(); err != nil {
		return err
	}
	nsh, err := vnetns.GetFromPath(filepath.Join(NetnsDir, NSPrefix+id))
	if err != nil {
		return fmt.Errorf("namespace of %s: %w", id, ErrNotFound)
	}
	defer nsh.Close()
	return writePolicy(int(nsh), p)
}

// AllowLearned lets the VM's guest reach addrs (IPv4; others are ignored)
// for ttl (clamped to MinLearnedTTL..MaxLearnedTTL) when its policy has
// AllowLearned, still after the deny list. It fails once the VM holds
// MaxLearned addresses.
func AllowLearned(ctx context.Context, id string, addrs []netip.Addr, ttl time.Duration) error {
	if !validID(id) {
		return fmt.Errorf("id %q: %w", id, ErrInvalid)
	}
	ttl = min(max(ttl, MinLearnedTTL), MaxLearnedTTL)
	nsh, err := vnetns.GetFromPath(filepath.Join(NetnsDir, NSPrefix+id))
	if err != nil {
		return fmt.Errorf("namespace of %s: %w", id, ErrNotFound)
	}
	defer nsh.Close()
	return addLearned(int(nsh), addrs, ttl)
}

// Teardown removes everything Setup created. It is idempotent: missing
// pieces are skipped, and calling it twice is fine. A QEMU still running in
// the namespace keeps the namespace object alive until it exits, but the
// links and the mount are removed regardless.
func (n *Net) Teardown(ctx context.Context) error {
	mu.Lock()
	defer mu.Unlock()
	return teardownLocked(n.ID)
}

// Teardown removes the network of VM id (see (*Net).Teardown).
func Teardown(ctx context.Context, id string) error {
	if !validID(id) {
		return fmt.Errorf("id %q: %w", id, ErrInvalid)
	}
	mu.Lock()
	defer mu.Unlock()
	return teardownLocked(id)
}

func teardownLocked(id string) error {
	var errs []error
	path := filepath.Join(NetnsDir, NSPrefix+id)
	// Delete the TAP explicitly: if a QEMU still holds the namespace the
	// namespace outlives the unmount, and a persistent TAP would linger.
	if nsh, err := vnetns.GetFromPath(path); err == nil {
		if nl, err := netlink.NewHandleAt(nsh); err == nil {
			// veth0 goes with its host end below (deleting one end of a
			// pair deletes both; each deletion waits for an RCU grace period).
			if l, err := nl.LinkByName(TapName); err == nil {
				if err := nl.LinkDel(l); err != nil {
					errs = append(errs, fmt.Errorf("deleting %s: %w", TapName, err))
				}
			}
			nl.Close()
		}
		nsh.Close()
	}
	if l, err := netlink.LinkByName(HostLinkName(id)); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("deleting host veth: %w", err))
		}
	}
	if _, err := os.Stat(path); err == nil {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", path, err))
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing %s: %w", path, err))
		}
	}
	return errors.Join(errs...)
}

// Reconcile removes VM networks left behind (after a crash) whose id keep
// rejects: namespaces named kiln-*, host links with a kiln alias or kv*
// name. It returns the ids it removed.
func Reconcile(ctx context.Context, keep func(id string) bool) ([]string, error) {
	mu.Lock()
	defer mu.Unlock()
	ids := map[string]bool{}
	ents, err := os.ReadDir(NetnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading %s: %w", NetnsDir, err)
	}
	for _, e := range ents {
		if id, ok := strings.CutPrefix(e.Name(), NSPrefix); ok && validID(id) {
			ids[id] = true
		}
	}
	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	var orphans []netlink.Link
	for _, l := range links {
		a := l.Attrs()
		if id, ok := strings.CutPrefix(a.Alias, aliasPrefix); ok && validID(id) {
			ids[id] = true
		} else if strings.HasPrefix(a.Name, HostLinkPrefix) && l.Type() == "veth" && a.Alias == "" {
			// A kv* veth without alias: Setup died between create and alias.
			orphans = append(orphans, l)
		}
	}
	var removed []string
	var errs []error
	for id := range ids {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		if keep(id) {
			continue
		}
		if err := teardownLocked(id); err != nil {
			errs = append(errs, fmt.Errorf("microvm %s: %w", id, err))
			continue
		}
		slog.Info("netns: removed leftover vm network", "microvm", id)
		removed = append(removed, id)
	}
	for _, l := range orphans {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("deleting orphan %s: %w", l.Attrs().Name, err))
		}
	}
	return removed, errors.Join(errs...)
}

// RemoveHostRules is RestoreHost for callers that do not care whether it
// acted (tests, uninstall).
func RemoveHostRules() error {
	_, err := RestoreHost()
	return err
}

// RestoreHost undoes kiln's host settings once no VM network of kiln is
// left (no kiln-* namespace, no host link with a kiln alias): it deletes
// the host nftables table `inet kiln` and puts net.ipv4.ip_forward back to
// the value recorded when kiln first turned it on (if kiln did). With VM
// networks left it does nothing and reports false: those VMs still need
// forwarding and the host table. `kiln server` calls it on shutdown.
func RestoreHost() (bool, error) {
	mu.Lock()
	defer mu.Unlock()
	unlock, err := lockHost(unix.LOCK_EX)
	if err != nil {
		return false, err
	}
	defer unlock()
	inUse, err := vmNetworksLeft()
	if err != nil || inUse {
		return false, err
	}
	if err := deleteHostTable(); err != nil {
		return false, fmt.Errorf("removing the host nftables table: %w", err)
	}
	if err := restoreForward(); err != nil {
		return false, err
	}
	return true, nil
}

func vmNetworksLeft() (bool, error) {
	ents, err := os.ReadDir(NetnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("reading %s: %w", NetnsDir, err)
	}
	for _, e := range ents {
		if id, ok := strings.CutPrefix(e.Name(), NSPrefix); ok && validID(id) {
			return true, nil
		}
	}
	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return false, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Alias, aliasPrefix) {
			return true, nil
		}
	}
	return false, nil
}

// HostStateDir holds what kiln must remember about the host's own
// settings: forward.orig, net.ipv4.ip_forward's value before kiln first
// set it, and the lock that orders Setup against RestoreHost across kiln
// processes. It is under /run on purpose: a reboot resets the sysctl and
// empties the directory together.
var HostStateDir = "/run/kiln"

const forwardOrig = "ip_forward.orig"

// lockHost takes an flock on HostStateDir/host.lock (LOCK_SH or LOCK_EX).
func lockHost(how int) (func(), error) {
	if err := os.MkdirAll(HostStateDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", HostStateDir, err)
	}
	f, err := os.OpenFile(filepath.Join(HostStateDir, "host.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening host lock: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// enableForward sets net.ipv4.ip_forward=1, first recording the value it
// replaces (only the first time: a later kiln must not record its own 1).
func enableForward() error {
	cur, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		return fmt.Errorf("reading net.ipv4.ip_forward: %w", err)
	}
	if strings.TrimSpace(string(cur)) == "1" {
		return nil
	}
	p := filepath.Join(HostStateDir, forwardOrig)
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(p, cur, 0o600); err != nil {
			return fmt.Errorf("recording net.ipv4.ip_forward: %w", err)
		}
	}
	return writeSysctl("net/ipv4/ip_forward", "1")
}

// restoreForward puts back the recorded ip_forward value, if any.
func restoreForward() error {
	p := filepath.Join(HostStateDir, forwardOrig)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", p, err)
	}
	v := strings.TrimSpace(string(b))
	if v != "0" && v != "1" {
		return fmt.Errorf("%s holds %q, not 0 or 1; leaving net.ipv4.ip_forward as it is", p, v)
	}
	if err := writeSysctl("net/ipv4/ip_forward", v); err != nil {
		return err
	}
	slog.Info("netns: restored net.ipv4.ip_forward", "value", v)
	return os.Remove(p)
}

// RunInNS runs fn on an OS thread switched into the namespace at nsPath,
// then switches the thread back. Sockets created and processes started
// (exec.Cmd.Start) inside fn live in that namespace. If switching back
// fails the thread is discarded, never reused.
func RunInNS(nsPath string, fn func() error) error {
	target, err := vnetns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", nsPath, err)
	}
	defer target.Close()
	return onThread(func() error {
		if err := vnetns.Set(target); err != nil {
			return fmt.Errorf("entering namespace %s: %w", nsPath, err)
		}
		return nil
	}, fn)
}

// netnsDirMount makes NetnsDir a shared mount of its own, as iproute2
// does before it names a namespace. A name mounted on a plain directory is
// hidden the moment a later `ip netns add` bind-mounts the directory onto
// itself: it can then be neither reached nor removed, and the VM's
// namespace leaks. Once NetnsDir is a mount point, iproute2 leaves it be.
func netnsDirMount() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		err = remountNetnsDir()
	}
	if err != nil {
		return fmt.Errorf("sharing %s: %w", NetnsDir, err)
	}
	return nil
}

// remountNetnsDir bind-mounts NetnsDir onto itself, shared, and moves the
// names already mounted on the plain directory (VMs of a kiln from before
// this, which outlive its restart) onto the new mount. Copied along by a
// recursive bind instead, each would stay mounted below too, and its file
// could never be removed.
func remountNetnsDir() error {
	ents, err := os.ReadDir(NetnsDir)
	if err != nil {
		return err
	}
	var names []string
	var nss []*os.File
	defer func() {
		for _, f := range nss {
			f.Close()
		}
	}()
	for _, e := range ents {
		path := filepath.Join(NetnsDir, e.Name())
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		var fs unix.Statfs_t
		if unix.Fstatfs(int(f.Fd()), &fs) != nil || fs.Type != unix.NSFS_MAGIC {
			f.Close() // not a mounted name
			continue
		}
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			f.Close()
			return fmt.Errorf("detaching %s: %w", path, err)
		}
		names, nss = append(names, path), append(nss, f)
	}
	var errs []error
	if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND, ""); err != nil {
		errs = append(errs, fmt.Errorf("making %s a mount point: %w", NetnsDir, err))
	} else if err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED, ""); err != nil {
		errs = append(errs, err)
	}
	// Mounted again whatever happened above: the open files keep each
	// namespace until then.
	for i, path := range names {
		if err := unix.Mount("/proc/self/fd/"+strconv.Itoa(int(nss[i].Fd())), path, "none", unix.MS_BIND, ""); err != nil {
			errs = append(errs, fmt.Errorf("naming %s again: %w", path, err))
		}
	}
	return errors.Join(errs...)
}

var netnsDirMu sync.Mutex

// createNamed creates and mounts a new named namespace and runs fn in it.
func createNamed(name string, fn func() error) error {
	if err := netnsDirMount(); err != nil {
		return err
	}
	return onThread(func() error {
		h, err := vnetns.NewNamed(name)
		if err != nil {
			return err
		}
		h.Close()
		return nil
	}, fn)
}

// mountNamed names namespace ns (a file of a namespace made ahead) as
// NetnsDir/name, as iproute2 and createNamed do: a bind mount.
func mountNamed(name string, ns *os.File) error {
	var st, self unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &st); err != nil {
		return err
	}
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		return err
	}
	if st.Dev == self.Dev && st.Ino == self.Ino {
		return fmt.Errorf("the spare namespace is the host's own: %w", ErrInvalid)
	}
	if err := netnsDirMount(); err != nil {
		return err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return err
	}
	f.Close()
	if err := unix.Mount("/proc/self/fd/"+strconv.Itoa(int(ns.Fd())), path, "none", unix.MS_BIND, ""); err != nil {
		os.Remove(path)
		return fmt.Errorf("naming the namespace: %w", err)
	}
	return nil
}

// onThread runs enter then fn on a dedicated locked OS thread and restores
// the thread's original network namespace.
func onThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := vnetns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			if vnetns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
			errc <- err
			return
		}
		ferr := fn()
		if err := vnetns.Set(orig); err != nil {
			// Keep the thread locked: the goroutine exits and the runtime
			// kills the thread instead of reusing it in the wrong namespace.
			errc <- errors.Join(ferr, fmt.Errorf("restoring namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// writeSysctl writes /proc/sys/<key>; net/* keys apply to the namespace of
// the calling thread, so callers inside onThread set the VM's values.
func writeSysctl(key, val string) error {
	p := "/proc/sys/" + key
	if cur, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(cur)) == val {
		return nil
	}
	if err := os.WriteFile(p, []byte(val), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, val, err)
	}
	return nil
}

// ensureHost turns on IPv4 forwarding (the guest egress path crosses the
// host) and (re)creates the host table if it is missing.
func ensureHost() error {
	if err := enableForward(); err != nil {
		return err
	}
	return ensureHostTable()
}

// dumpRetries bounds how often a netlink dump the kernel interrupted is
// asked again.
const dumpRetries = 5

// retryDump runs dump again while the kernel says it was interrupted
// (links or addresses changed during it, as other VMs' networks come and
// go): its partial answer failed a VM's start ("results may be incomplete
// or inconsistent"), and could have handed out a /30 in use.
func retryDump[T any](dump func() (T, error)) (T, error) {
	for i := 0; ; i++ {
		v, err := dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == dumpRetries {
			return v, err
		}
	}
}

// allocate picks the first free /30 in pool, looking at the addresses of
// existing kiln host links. It returns the host end (.1) and the VM
// namespace end (.2).
func allocate(pool netip.Prefix) (netip.Addr, netip.Addr, error) {
	used := map[netip.Addr]bool{}
	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		if !strings.HasPrefix(l.Attrs().Name, HostLinkPrefix) {
			continue
		}
		addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, netlink.FAMILY_V4) })
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
				used[netip.PrefixFrom(ip, 30).Masked().Addr()] = true
			}
		}
	}
	slots := 1 << (30 - pool.Bits())
	base := pool.Addr().As4()
	b := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	for i := 0; i < slots; i++ {
		v := b + uint32(i)*4
		net0 := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		if used[net0] {
			continue
		}
		return net0.Next(), net0.Next().Next(), nil
	}
	return netip.Addr{}, netip.Addr{}, fmt.Errorf("address pool %s exhausted (%d vms): %w", pool, slots, ErrInvalid)
}

// HostLinkName is the host-side veth name of VM id ("kv" + 10 hex digits
// of its SHA-256: link names are limited to 15 bytes).
func HostLinkName(id string) string {
	h := sha256.Sum256([]byte(id))
	return HostLinkPrefix + hex.EncodeToString(h[:5]) // 12 bytes < IFNAMSIZ
}

func addr30(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(30, 32)}}
}

func linkUp(nl *netlink.Handle, name string) error {
	l, err := nl.LinkByName(name)
	if err != nil {
		return err
	}
	return nl.LinkSetUp(l)
}

func linkAddr(nl *netlink.Handle, name string, a *netlink.Addr) error {
	l, err := nl.LinkByName(name)
	if err != nil {
		return err
	}
	return nl.AddrAdd(l, a)
}

// HostDialer returns a dialer whose connections carry DialMark, the only
// host connections the host table lets into VM links.
func HostDialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{
		Timeout:   timeout,
		KeepAlive: 30 * time.Second,
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, DialMark)
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("marking a connection to a guest (SO_MARK needs CAP_NET_ADMIN): %w", serr)
			}
			return nil
		},
	}
}

// NewSpare makes an unnamed network namespace, alive while the returned
// file (or a process's TAP in it) is open, holding what every VM namespace
// holds before its VM is known: the sysctls, a persistent TAP named TapName
// with the gateway's MAC and address, the loopback with the metadata
// address. A clone pool's process waits there with its TAP open; nothing
// else is in it (no host link, no route out), so nothing the guest sends
// goes anywhere until Setup (Config.Spare) makes it a VM's namespace, or
// AdoptTap moves its TAP into one. One spare per process: namespaces are
// never shared between VMs.
func NewSpare() (*os.File, error) {
	var f *os.File
	err := onThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("making a spare namespace: %w", err)
		}
		return nil
	}, func() error {
		var err error
		if f, err = os.Open("/proc/thread-self/ns/net"); err != nil {
			return err
		}
		if err := nsBase(0); err != nil {
			return err
		}
		nl, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer nl.Close()
		for _, step := range nsLinkSteps(nl) {
			if err := step.fn(); err != nil {
				return fmt.Errorf("spare namespace: %s: %w", step.name, err)
			}
		}
		return nil
	})
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, err
	}
	return f, nil
}

// AdoptTap makes the TAP of spare (NewSpare), already held open by a
// QEMU, the TAP of the VM network at nsPath (made by Setup without a
// spare): the namespace's own TAP, not yet opened by anyone, steps aside
// and the spare's moves in and gets the gateway's address, as Setup does.
// Setup's rules match the TAP by name, and a device moved into a namespace
// takes that namespace's defaults (rp_filter=1, disable_ipv6=1) as a new
// one does. Moving a device waits for RCU grace periods (tens of ms on a
// busy host); Setup with Config.Spare needs no move.
func AdoptTap(ctx context.Context, nsPath string, spare *os.File) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	mu.Lock()
	defer mu.Unlock()
	hh, err := netlink.NewHandleAt(vnetns.NsHandle(int(spare.Fd())))
	if err != nil {
		return fmt.Errorf("netlink handle in the spare namespace: %w", err)
	}
	defer hh.Close()
	nsh, err := vnetns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", nsPath, err)
	}
	defer nsh.Close()
	nl, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink handle in namespace %s: %w", nsPath, err)
	}
	defer nl.Close()
	l, err := hh.LinkByName(TapName)
	if err != nil {
		return fmt.Errorf("finding the spare namespace's tap: %w", err)
	}
	// The namespace's own TAP steps aside under another name and is
	// deleted after this returns: a deletion waits for an RCU grace
	// period, which a clone need not wait for.
	if o, err := nl.LinkByName(TapName); err == nil {
		if err := nl.LinkSetName(o, "tap0old"); err != nil {
			return fmt.Errorf("replacing %s in %s: %w", TapName, nsPath, err)
		}
		defer func() {
			go func() {
				ns, err := vnetns.GetFromPath(nsPath)
				if err != nil {
					return // torn down meanwhile, and the TAP with it
				}
				defer ns.Close()
				h, err := netlink.NewHandleAt(ns)
				if err != nil {
					return
				}
				defer h.Close()
				if err := h.LinkDel(o); err != nil {
					slog.Warn("netns: deleting a replaced tap", "ns", nsPath, "err", err)
				}
			}()
		}()
	}
	if err := hh.LinkSetNsFd(l, int(nsh)); err != nil {
		return fmt.Errorf("moving the spare tap into %s: %w", nsPath, err)
	}
	// The move kept the name and MAC but dropped the address and the
	// link state.
	if err := linkAddr(nl, TapName, addr30(GatewayAddr)); err != nil {
		return fmt.Errorf("tap address: %w", err)
	}
	if err := linkUp(nl, TapName); err != nil {
		return fmt.Errorf("tap up: %w", err)
	}
	return nil
}
