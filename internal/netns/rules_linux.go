//go:build linux

package netns

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Rules are written with google/nftables, never by running nft. Both
// tables are family inet so one table sees IPv4 and IPv6 (IPv6 from guests
// is dropped, never forwarded).

const ctStatusDNAT = 0x20 // IPS_DST_NAT

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// ifMatch compares iifname/oifname; a name ending in '*' matches the prefix
// (nft compares only the given bytes, like `iifname "kv*"`).
func ifMatch(key expr.MetaKey, name string, op expr.CmpOp) []expr.Any {
	data := ifname(name)
	if l := len(name); l > 0 && name[l-1] == '*' {
		data = []byte(name[:l-1])
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

func iif(name string) []expr.Any { return ifMatch(expr.MetaKeyIIFNAME, name, expr.CmpOpEq) }
func oif(name string) []expr.Any { return ifMatch(expr.MetaKeyOIFNAME, name, expr.CmpOpEq) }

func ctStateEstRel() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

func ctStatusDNATed() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ctStatusDNAT),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

func nfproto(p byte, op expr.CmpOp) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte{p}},
	}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func dport(p uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(p)},
	}
}

// daddrIn matches an IPv4 destination inside prefix p (caller checked
// nfproto ipv4 first).
func daddrIn(p netip.Prefix) []expr.Any {
	p = p.Masked()
	a := p.Addr().As4()
	m := netipMask(p.Bits())
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m[:], Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]},
	}
}

// saddrNot matches an IPv4 source other than a.
func saddrNot(a netip.Addr) []expr.Any {
	b := a.As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: b[:]},
	}
}

func netipMask(bits int) [4]byte {
	v := ^uint32(0) << (32 - bits)
	if bits == 0 {
		v = 0
	}
	return [4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

var (
	accept = verdict(expr.VerdictAccept)
	drop   = verdict(expr.VerdictDrop)
)

func policy(p nftables.ChainPolicy) *nftables.ChainPolicy { return &p }

// ensureHostTable creates the host table "kiln" (family inet) if missing:
//   - input: VMs may not reach any host address (only replies pass);
//   - forward: nothing is forwarded into a VM link (host→guest traffic is
//     locally generated); from VM links only IPv4 to non-denied
//     destinations; replies pass;
//   - output: the host sends into VM links only on connections marked
//     DialMark (HostDialer), so local users cannot skip the proxy;
//   - postrouting: masquerade what VMs send out of non-VM links.
//
// The rules match kv* links, so one table serves every VM.
// hostTableRev names the host table's rules; change it whenever they
// change (rev-3: the deny list has the documentation blocks again).
const hostTableRev = "rev-3"

func ensureHostTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	tabs, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	for _, t := range tabs {
		if t.Name != TableName {
			continue
		}
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
		if err != nil {
			return fmt.Errorf("listing nftables chains: %w", err)
		}
		for _, ch := range chains {
			if ch.Table.Name == TableName && ch.Name == hostTableRev {
				return nil
			}
		}
		// A table from a kiln whose rules differ (no revision chain, or
		// another one): replaced in the same transaction, so no packet
		// sees it half-written.
		c.DelTable(t)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: TableName})
	// An empty chain named after the rules' revision tells a later kiln
	// whether this table is its own.
	c.AddChain(&nftables.Chain{Name: hostTableRev, Table: t})
	vm := HostLinkPrefix + "*"
	in := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: policy(nftables.ChainPolicyAccept)})
	fw := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: policy(nftables.ChainPolicyAccept)})
	out := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: policy(nftables.ChainPolicyAccept)})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }

	add(in, join(iif(vm), ctStateEstRel(), accept))
	add(in, join(iif(vm), drop))

	add(fw, join(oif(vm), ctStateEstRel(), accept))
	add(fw, join(oif(vm), drop))
	add(fw, join(iif(vm), nfproto(unix.NFPROTO_IPV4, expr.CmpOpNeq), drop))
	for _, p := range DenyV4 {
		add(fw, join(iif(vm), daddrIn(p), drop))
	}
	add(fw, join(iif(vm), accept))

	// Replies and ICMP errors (path MTU) on traffic that was let in.
	add(out, join(oif(vm), ctStateEstRel(), accept))
	add(out, join(oif(vm), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(DialMark)},
		&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED},
	}))

	add(post, join(nfproto(unix.NFPROTO_IPV4, expr.CmpOpEq), iif(vm),
		ifMatch(expr.MetaKeyOIFNAME, vm, expr.CmpOpNeq), []expr.Any{&expr.Masq{}}))
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing host nftables table: %w", err)
	}
	return nil
}

func deleteHostTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	tabs, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	for _, t := range tabs {
		if t.Name == TableName {
			c.DelTable(t)
			return c.Flush()
		}
	}
	return nil
}

// writeVMTable writes the VM namespace's table "kiln":
//   - prerouting: TCP from the host to HostAddr → DNAT to GuestAddr (same port);
//   - postrouting: masquerade into the TAP (the guest sees 172.30.0.1, not
//     host addresses) and out of the veth (egress);
//   - forward (policy drop): replies; host→guest DNATed traffic; with
//     egress, jump to chain "egress" (deny list, then accept IPv4);
//   - input (policy drop): loopback, replies, and with egress DNS to the
//     gateway forwarder;
//   - with a package proxy: the guest's TCP to port 80 of a mirror address
//     is DNATed to the proxy at the gateway (so it reaches input, never
//     forward and its deny list), and input lets the guest reach it.
func writeVMTable(nsFd int, n *Net, cfg Config) error {
	c, err := nftables.New(nftables.WithNetNSFd(nsFd))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: TableName})
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	fw := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: policy(nftables.ChainPolicyDrop)})
	in := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: policy(nftables.ChainPolicyDrop)})
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	v4 := nfproto(unix.NFPROTO_IPV4, expr.CmpOpEq)
	guest := GuestAddr.As4()

	add(pre, join(iif(NSVethName), v4, l4proto(unix.IPPROTO_TCP), daddrIn(netip.PrefixFrom(n.HostAddr, 32)),
		[]expr.Any{
			&expr.Immediate{Register: 1, Data: guest[:]},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		}))
	add(post, join(v4, oif(TapName), []expr.Any{&expr.Masq{}}))
	add(post, join(v4, oif(NSVethName), []expr.Any{&expr.Masq{}}))

	add(fw, join(ctStateEstRel(), accept))
	add(fw, join(iif(NSVethName), oif(TapName), ctStatusDNATed(), accept))

	add(in, join(iif("lo"), accept))
	add(in, join(ctStateEstRel(), accept))
	// The guest (its own address only) may reach the metadata service
	// served in this namespace, with or without egress.
	add(in, join(iif(TapName), v4, daddrIn(netip.PrefixFrom(MetadataAddr, 32)), l4proto(unix.IPPROTO_TCP), dport(MetadataPort),
		saddrNot(GuestAddr), drop))
	add(in, join(iif(TapName), v4, daddrIn(netip.PrefixFrom(MetadataAddr, 32)), l4proto(unix.IPPROTO_TCP), dport(MetadataPort), accept))

	if cfg.Egress {
		eg := c.AddChain(&nftables.Chain{Name: "egress", Table: t})
		// Only the guest's own address may leave: spoofed sources are dropped.
		add(eg, join(saddrNot(GuestAddr), drop))
		for _, p := range append(append([]netip.Prefix{}, DenyV4...), cfg.ExtraDeny...) {
			add(eg, join(daddrIn(p), drop))
		}
		// The tenant's own policy (SetEgressPolicy), after the denies it
		// can never lift.
		c.AddChain(&nftables.Chain{Name: policyChain, Table: t})
		if err := c.AddSet(&nftables.Set{Table: t, Name: learnedSet, KeyType: nftables.TypeIPAddr, HasTimeout: true, Size: MaxLearned}, nil); err != nil {
			return fmt.Errorf("nftables set: %w", err)
		}
		add(eg, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: policyChain}})
		add(eg, accept)
		add(fw, join(iif(TapName), oif(NSVethName), v4, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "egress"}}))
		gw := netip.PrefixFrom(GatewayAddr, 32)
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			add(in, join(iif(TapName), v4, daddrIn(gw), l4proto(proto), dport(53), accept))
		}
		if r := cfg.PackageProxy; r != nil {
			gwb := GatewayAddr.As4()
			for _, a := range r.Addrs {
				add(pre, join(iif(TapName), v4, l4proto(unix.IPPROTO_TCP), daddrIn(netip.PrefixFrom(a, 32)), dport(80),
					[]expr.Any{
						&expr.Immediate{Register: 1, Data: gwb[:]},
						&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(r.Port)},
						&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
					}))
			}
			add(in, join(iif(TapName), v4, daddrIn(gw), l4proto(unix.IPPROTO_TCP), dport(r.Port), saddrNot(GuestAddr), drop))
			add(in, join(iif(TapName), v4, daddrIn(gw), l4proto(unix.IPPROTO_TCP), dport(r.Port), accept))
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing vm nftables table: %w", err)
	}
	return nil
}

// readEgress reports whether the VM table has the egress chain.
func readEgress(nsFd int) (bool, error) {
	c, err := nftables.New(nftables.WithNetNSFd(nsFd))
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == TableName && ch.Name == "egress" {
			return true, nil
		}
	}
	return false, nil
}

// policyChain holds a VM's own egress policy (EgressPolicy); the egress
// chain jumps to it after the deny list and accepts what it returns.
const policyChain = "policy"

// writePolicy replaces the rules of the VM table's policy chain in one
// transaction: allowed prefixes are accepted first, then denied ones
// dropped; the rest returns to the egress chain (accepted).
func writePolicy(nsFd int, p EgressPolicy) error {
	c, err := nftables.New(nftables.WithNetNSFd(nsFd))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("listing chains: %w", err)
	}
	var ch *nftables.Chain
	for _, x := range chains {
		if x.Table.Name == TableName && x.Name == policyChain {
			ch = x
		}
	}
	if ch == nil {
		return fmt.Errorf("the vm's network has no egress policy chain (no egress, or made by an older kiln): %w", ErrNotFound)
	}
	c.FlushChain(ch)
	set, err := c.GetSetByName(ch.Table, learnedSet)
	if err != nil {
		return fmt.Errorf("the vm's network has no set of learned addresses (made by an older kiln): %w", ErrNotFound)
	}
	if p.AllowLearned {
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			&expr.Verdict{Kind: expr.VerdictAccept},
		}})
	} else {
		c.FlushSet(set)
	}
	for _, a := range p.Allow {
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: join(daddrIn(a), accept)})
	}
	for _, d := range p.Deny {
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: join(daddrIn(d), drop)})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing the vm's egress policy: %w", err)
	}
	return nil
}

// learnedSet holds the addresses a VM may reach because its DNS answers
// named them for an allowed domain (AllowLearned), each for its TTL.
const learnedSet = "learned4"

// addLearned adds addresses to the VM table's learned set for ttl.
func addLearned(nsFd int, addrs []netip.Addr, ttl time.Duration) error {
	c, err := nftables.New(nftables.WithNetNSFd(nsFd))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	set, err := c.GetSetByName(&nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}, learnedSet)
	if err != nil {
		return fmt.Errorf("the vm's network has no set of learned addresses: %w", ErrNotFound)
	}
	elems := make([]nftables.SetElement, 0, len(addrs))
	for _, a := range addrs {
		if a.Is4() {
			b := a.As4()
			elems = append(elems, nftables.SetElement{Key: b[:], Timeout: ttl})
		}
	}
	if err := c.SetAddElements(set, elems); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("adding learned addresses: %w", err)
	}
	return nil
}
