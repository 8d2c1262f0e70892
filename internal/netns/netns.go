// Package netns gives every microVM its own network namespace: a TAP device
// for the guest NIC, a veth pair to the host, NAT so the host reaches guest
// ports, and an nftables egress policy. Every guest sees the same addresses
// (GuestAddr/GatewayAddr), so clones of one snapshot need no reconfiguration;
// the host tells VMs apart by the per-VM veth address (HostAddr).
//
// Layout, per VM (namespace "kiln-<id>"):
//
//	host ns                        VM ns kiln-<id>                 guest
//	kvXXXXXXXXXX 10.200.n.1/30 <-> veth0 10.200.n.2/30
//	                               tap0  172.30.0.1/30  <-QEMU->  eth0 172.30.0.2/30
//
// Host→guest: connect to HostAddr:P; the VM ns DNATs it to 172.30.0.2:P and
// masquerades it to 172.30.0.1, so the guest never learns host addresses.
// Guest egress (only with Config.Egress): forwarded tap0→veth0, masqueraded
// twice (VM ns, then host), with private, link-local, metadata and host
// addresses denied in both namespaces (DenyV4, from internal/egress), plus
// the operator's ExtraDeny in the VM namespace. Reverse-path filtering is
// strict in every VM namespace, so a guest cannot send with another
// source address.
//
// Host settings kiln changes: net.ipv4.ip_forward=1 (its earlier value is
// kept in HostStateDir) and the nftables table `inet kiln`; RestoreHost
// undoes both once no VM namespace of kiln is left.
//
// DNS: the guest's resolver is 172.30.0.1:53, served by internal/dnsfwd.
// Without egress, port 53 is closed too: DNS queries are a channel out of
// the VM (data can be encoded into names), so "nothing leaves the VM"
// includes DNS.
package netns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Fixed addresses every guest sees (the agent configures them from the
// kernel command line).
var (
	GuestAddr   = netip.MustParseAddr("172.30.0.2")
	GatewayAddr = netip.MustParseAddr("172.30.0.1")
	GuestPrefix = netip.MustParsePrefix("172.30.0.0/30")
	// MetadataAddr is the instance metadata service's address (AWS's
	// IMDS), served per VM by internal/imds on MetadataPort inside the
	// VM's namespace.
	MetadataAddr = netip.MustParseAddr("169.254.169.254")
	// DefaultPool is where per-VM /30 host links come from. It sits inside
	// 10/8 on purpose (the guest deny list covers it) and away from the
	// host's 10.255.x resolver network.
	DefaultPool = netip.MustParsePrefix("10.200.0.0/16")
)

// Fixed MAC addresses (locally administered). Every TAP gets GatewayMAC so
// that a guest restored from a snapshot finds the gateway at the MAC its
// ARP cache already holds; with a random TAP MAC, its packets to the
// gateway would be dropped until the stale entry was re-probed (seconds).
// The engine should give the guest NIC GuestMAC (QEMU
// `-device virtio-net-...,mac=02:6b:69:6c:6e:02`) for the same reason.
var (
	GatewayMAC = net.HardwareAddr{0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x01}
	GuestMAC   = net.HardwareAddr{0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x02}
)

const (
	// TapName is the guest NIC's TAP device inside every VM namespace.
	TapName = "tap0"
	// NSVethName is the VM-namespace end of the host veth pair.
	NSVethName = "veth0"
	// MetadataPort is the metadata service's TCP port.
	MetadataPort = 80
	// NSPrefix prefixes every namespace name (/run/netns/kiln-<id>).
	NSPrefix = "kiln-"
	// HostLinkPrefix prefixes host-side veth names; the id is kept in the
	// link alias ("kiln:<id>") because link names are limited to 15 bytes.
	HostLinkPrefix = "kv"
	aliasPrefix    = "kiln:"
	// TableName is the nftables table (family inet) kiln owns, both in the
	// host namespace (shared rules for all kv* links) and in each VM ns.
	TableName = "kiln"
	// NetnsDir is where named namespaces are bind-mounted (iproute2's place,
	// so `ip netns exec kiln-<id>` works for debugging).
	NetnsDir = "/run/netns"
)

// ErrInvalid reports a bad id or config; ErrNotFound a VM network that does
// not exist; ErrExists a Setup for an id whose namespace already exists.
var (
	ErrInvalid  = errors.New("invalid network config")
	ErrNotFound = errors.New("vm network not found")
	ErrExists   = errors.New("vm network already exists")
)

// Config describes one VM's network. It is fixed for the VM's life (across
// suspend/resume the namespace stays).
type Config struct {
	// ID is the microVM id: 1-64 of [A-Za-z0-9_-].
	ID string
	// Egress is the INTERNET_EGRESS connector: NATed internet access (never
	// host, other VMs or private/link-local/metadata ranges) and DNS via the
	// gateway forwarder. Without it nothing leaves the VM.
	Egress bool
	// Pool overrides DefaultPool (a prefix of /16../29 inside 10/8 advised).
	Pool netip.Prefix
	// TapOwner is the uid allowed to open the TAP (QEMU); 0 = root only.
	TapOwner uint32
	// ExtraDeny adds prefixes the guest may never reach (the operator's
	// --deny-cidr, for example the host's LAN) on top of DenyV4. IPv6
	// prefixes are ignored here: no IPv6 leaves a VM.
	ExtraDeny []netip.Prefix
	// PackageProxy (with Egress; build VMs) sends the guest's plain-HTTP
	// connections to the operator's Debian mirrors to kiln's package
	// proxy (internal/pkgproxy) at the gateway instead of out: those
	// downloads are cached per account, and a mirror that answers on a
	// denied address (this very host's answers in a documentation range)
	// stays usable while the guest itself may still not reach it.
	PackageProxy *Redirect
	// Spare, when set, is a namespace made ahead by NewSpare (a clone
	// pool's process waits there with its TAP open): Setup names it and
	// adds the VM's host link, routes and rules instead of making a new
	// namespace and TAP. Its TAP already has the gateway's MAC and address.
	Spare *os.File
}

// Redirect is a transparent redirect, in the VM's namespace, of the
// guest's TCP connections to port 80 of Addrs to GatewayAddr:Port.
type Redirect struct {
	// Addrs are the mirrors' addresses (IPv4; others are ignored).
	Addrs []netip.Addr
	// Port is where the proxy listens on GatewayAddr.
	Port uint16
}

// EgressPolicy is a VM's own egress rules, on top of the deny list it
// can never lift (DenyV4, ExtraDeny): a destination in Allow is let out,
// else one in Deny is dropped, else it is let out. IPv4 only (no IPv6
// leaves a VM); at most MaxPolicyPrefixes in all.
type EgressPolicy struct {
	Allow []netip.Prefix
	Deny  []netip.Prefix
	// AllowLearned lets the guest reach the addresses AllowLearned adds
	// (those DNS answers named for allowed domains), before Deny; without
	// it they are dropped from the set.
	AllowLearned bool
}

// MaxLearned bounds the learned addresses a VM holds at once; more are
// not added (their names then answer, but connections to them follow
// Deny).
const MaxLearned = 4096

// Learned address lifetimes: a DNS answer's TTL, within these bounds, so
// that a zero TTL still lets the connection that follows through and a
// long one does not keep an address open after the name moved.
const (
	MinLearnedTTL = 30 * time.Second
	MaxLearnedTTL = time.Hour
)

// MaxPolicyPrefixes bounds an EgressPolicy: every prefix is one rule a
// forwarded packet may be matched against.
const MaxPolicyPrefixes = 1024

// Check refuses a policy with an invalid or non-IPv4 prefix or too many.
func (p EgressPolicy) Check() error {
	if len(p.Allow)+len(p.Deny) > MaxPolicyPrefixes {
		return fmt.Errorf("%d prefixes; at most %d: %w", len(p.Allow)+len(p.Deny), MaxPolicyPrefixes, ErrInvalid)
	}
	for _, l := range [][]netip.Prefix{p.Allow, p.Deny} {
		for _, x := range l {
			if !x.IsValid() || !x.Addr().Is4() {
				return fmt.Errorf("prefix %s is not an IPv4 prefix: %w", x, ErrInvalid)
			}
		}
	}
	return nil
}

// Net is one VM's network, as created by Setup or found by Open.
type Net struct {
	ID     string
	Egress bool
	// NSPath is the bind-mounted namespace file: QEMU must run inside it
	// (setns(open(NSPath), CLONE_NEWNET) before exec, or RunInNS).
	NSPath string
	// NSName is the name under NetnsDir (`ip netns exec NSName ...`).
	NSName string
	// Tap is the TAP device name inside the namespace (QEMU ifname=).
	Tap string
	// HostLink is the host-side veth name.
	HostLink string
	// HostAddr is the address the host dials to reach guest TCP ports:
	// netip.AddrPortFrom(HostAddr, port) arrives at GuestAddr:port.
	HostAddr netip.Addr
	// HostPeer is the host end's own address (the VM namespace's gateway).
	HostPeer netip.Addr
}

// DialMark is the socket mark (SO_MARK) of host connections to guests.
// The host table rejects any other packet the host sends into a VM link,
// so a local user cannot reach a guest's ports around the endpoint proxy
// and its tokens; setting a mark needs CAP_NET_ADMIN.
const DialMark = 0x6b696c6e // "kiln"

// Attachment is what the VM driver needs to give the VM this network:
// its TAP, in its namespace, with the MAC every guest has.
func (n *Net) Attachment() *vmm.NetAttachment {
	return &vmm.NetAttachment{Netns: n.NSPath, Tap: n.Tap, MAC: GuestMAC.String()}
}

// GuestDial returns the host-side address that reaches guest TCP port p;
// dial it with HostDialer.
func (n *Net) GuestDial(p uint16) string {
	return netip.AddrPortFrom(n.HostAddr, p).String()
}

// DenyV4 is what a guest with egress may never reach: the IPv4 part of
// internal/egress's deny list, the same list kiln's own fetches for
// tenants obey (private, shared, loopback, link-local and the cloud
// metadata addresses, documentation, benchmarking, multicast, reserved).
// Build VMs reach the operator's Debian mirrors, wherever those answer,
// only through kiln's package proxy (Config.PackageProxy).
// IPv6 is not forwarded at all, which covers fc00::/7, fe80::/10 and
// fd00:ec2::254.
var DenyV4 = egress.IPv4(egress.Denied())

func validID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}
