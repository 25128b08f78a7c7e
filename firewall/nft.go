//go:build linux

package firewall

import (
	"fmt"
	"net/netip"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The expressions below are written the way nft itself encodes the same
// rule (a protocol match before a header load, a network-layer family match
// before an address), so that `nft list ruleset` prints them as rules a
// person can read.

func table(name string) *nftables.Table {
	return &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
}

// replaceTable queues the removal of table t whatever its state: `add
// table` creates it when absent (and is a no-op when present), so the
// `delete table` after it cannot fail. When keep, t is added again, empty,
// for new contents to follow in the same batch.
func replaceTable(c *nftables.Conn, t *nftables.Table, keep bool) {
	c.AddTable(t)
	c.DelTable(t)
	if keep {
		c.AddTable(t)
	}
}

type builder struct {
	c     *nftables.Conn
	t     *nftables.Table
	chain *nftables.Chain
	err   *error // the first error of the whole batch
}

func (b *builder) rule(comment string, exprs ...expr.Any) {
	r := &nftables.Rule{Table: b.t, Chain: b.chain, Exprs: exprs}
	if comment != "" {
		r.UserData = userdata.AppendString(nil, userdata.TypeComment, comment)
	}
	b.c.AddRule(r)
}

func baseChain(c *nftables.Conn, t *nftables.Table, name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority, err *error) *builder {
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: &policy})
	return &builder{c: c, t: t, chain: ch, err: err}
}

func regularChain(c *nftables.Conn, t *nftables.Table, name string, err *error) *builder {
	return &builder{c: c, t: t, chain: c.AddChain(&nftables.Chain{Name: name, Table: t}), err: err}
}

// --- matches (all load into register 1) ---

func cmpEq(data []byte) expr.Any {
	return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data}
}

func meta(key expr.MetaKey) expr.Any { return &expr.Meta{Key: key, Register: 1} }

// Meta values are in host byte order, as the kernel stores them.
func markIs(m uint32) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyMARK), cmpEq(binaryutil.NativeEndian.PutUint32(m))}
}

func skuidIs(uid uint32) []expr.Any {
	return []expr.Any{meta(expr.MetaKeySKUID), cmpEq(binaryutil.NativeEndian.PutUint32(uid))}
}

// cgroupIs is `socket cgroupv2 level N <id>`; the kernel copies the u64 id
// into the register in host byte order.
func cgroupIs(level uint32, id uint64) []expr.Any {
	return []expr.Any{
		&expr.Socket{Key: expr.SocketKeyCgroupv2, Level: level, Register: 1},
		cmpEq(binaryutil.NativeEndian.PutUint64(id)),
	}
}

// ifname is an interface name as meta oifname loads it: IFNAMSIZ bytes,
// zero-padded, so the comparison is exact (no prefix match).
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func oifnameIs(name string) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyOIFNAME), cmpEq(ifname(name))}
}

func iifnameIs(name string) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyIIFNAME), cmpEq(ifname(name))}
}

func l4protoIs(proto byte) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyL4PROTO), cmpEq([]byte{proto})}
}

func nfprotoIs(family byte) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyNFPROTO), cmpEq([]byte{family})}
}

// port matches a TCP or UDP port: sport at offset 0, dport at 2.
func port(proto byte, offset uint32, p uint16) []expr.Any {
	return append(l4protoIs(proto),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2},
		cmpEq(binaryutil.BigEndian.PutUint16(p)))
}

const (
	sport = 0
	dport = 2
)

// addrIn matches the source or destination address against a prefix.
func addrIn(dst bool, p netip.Prefix) []expr.Any {
	var fam byte = unix.NFPROTO_IPV4
	off, n := uint32(12), uint32(4) // IPv4 saddr
	if dst {
		off = 16
	}
	if p.Addr().Is6() {
		fam, off, n = unix.NFPROTO_IPV6, 8, 16
		if dst {
			off = 24
		}
	}
	e := append(nfprotoIs(fam), &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n})
	if p.Bits() < p.Addr().BitLen() {
		e = append(e, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: prefixMask(p), Xor: make([]byte, n)})
	}
	return append(e, cmpEq(p.Masked().Addr().AsSlice()))
}

func prefixMask(p netip.Prefix) []byte {
	m := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// hopLimitIs matches the IPv6 hop limit (byte 7 of the header).
func hopLimitIs(h byte) []expr.Any {
	return append(nfprotoIs(unix.NFPROTO_IPV6),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 7, Len: 1},
		cmpEq([]byte{h}))
}

// icmpv6TypeIn matches the ICMPv6 type against an anonymous constant set
// added to the same batch.
func (b *builder) icmpv6TypeIn(types ...byte) []expr.Any {
	set := &nftables.Set{Table: b.t, Anonymous: true, Constant: true, KeyType: nftables.TypeICMP6Type}
	elems := make([]nftables.SetElement, len(types))
	for i, t := range types {
		elems[i] = nftables.SetElement{Key: []byte{t}}
	}
	if err := b.c.AddSet(set, elems); err != nil && *b.err == nil {
		*b.err = fmt.Errorf("icmpv6 type set: %w", err)
	}
	return append(l4protoIs(unix.IPPROTO_ICMPV6),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID})
}

// --- statements ---

func counter() expr.Any { return &expr.Counter{} }

func accept() expr.Any { return &expr.Verdict{Kind: expr.VerdictAccept} }

func jump(chain string) expr.Any { return &expr.Verdict{Kind: expr.VerdictJump, Chain: chain} }

// setMark is `meta mark set m`.
func setMark(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// rejectReset is `reject with tcp reset`: the sending socket receives a
// RST, so connect() fails with ECONNREFUSED at once.
func rejectReset() expr.Any { return &expr.Reject{Type: unix.NFT_REJECT_TCP_RST} }

// rejectProhibited is `reject with icmpx admin-prohibited`: ICMP type 3
// code 13 for IPv4, ICMPv6 type 1 code 1 for IPv6.
func rejectProhibited() expr.Any {
	return &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func one(e ...expr.Any) []expr.Any { return e }

// --- the tables ---

// NDP message types (RFC 4861) and MLD reports (RFC 2710, RFC 3810).
const (
	icmpv6RouterSolicit   = 133
	icmpv6RouterAdvert    = 134
	icmpv6NeighborSolicit = 135
	icmpv6NeighborAdvert  = 136
	icmpv6Redirect        = 137
	icmpv6MLDQuery        = 130
	icmpv6MLDReport       = 131
	icmpv6MLDDone         = 132
	icmpv6MLD2Report      = 143
)

// blockChain is the reject every block rule jumps to.
const blockChain = "block"

// addPerApp queues the per-app table's contents (the table itself is added
// by replaceTable).
func addPerApp(c *nftables.Conn, r *resolved) error {
	var err error
	t := table(PerAppTable)
	blk := regularChain(c, t, blockChain, &err)
	blk.rule("TCP: a reset, connect() fails with ECONNREFUSED", cat(l4protoIs(unix.IPPROTO_TCP), one(counter(), rejectReset()))...)
	blk.rule("others: ICMP admin-prohibited", counter(), rejectProhibited())

	out := baseChain(c, t, "output", nftables.ChainTypeRoute, nftables.ChainHookOutput, nftables.ChainPriorityMangle, &err)
	out.rule("mpvpn's own sockets: never touched", cat(markIs(r.own), one(accept()))...)
	out.rule("to this machine: nothing to route", cat(oifnameIs("lo"), one(accept()))...)
	// The kernel sends NDP and MLD from sockets of its own, which a rule
	// for uid 0 or the root cgroup would match; re-routed by a mark they
	// would go into the TUN and IPv6 would stop working on the link.
	out.rule("NDP and MLD: the kernel's own, link-scoped", cat(out.icmpv6TypeIn(
		icmpv6RouterSolicit, icmpv6RouterAdvert, icmpv6NeighborSolicit, icmpv6NeighborAdvert, icmpv6Redirect,
		icmpv6MLDQuery, icmpv6MLDReport, icmpv6MLDDone, icmpv6MLD2Report), one(accept()))...)
	direct := false
	for _, rule := range r.rules {
		var match []expr.Any
		switch rule.Selector.kind {
		case selUID:
			match = skuidIs(rule.Selector.uid)
		case selCgroup:
			match = cgroupIs(rule.cgroup.Level, rule.cgroup.ID)
		}
		var verdict []expr.Any
		switch rule.Action {
		case Tunnel:
			verdict = cat(setMark(r.tunnel), one(accept()))
		case Direct:
			verdict = cat(setMark(r.direct), one(accept()))
			direct = true
		case Block:
			verdict = one(jump(blockChain))
		}
		out.rule("rule "+strconv.Itoa(rule.n)+": "+rule.String(), cat(match, one(counter()), verdict)...)
	}
	if !direct {
		return err
	}
	// A Direct packet re-routed past the TUN still has the source address
	// the socket chose for the TUN: give it the output interface's.
	nat := baseChain(c, t, "postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, &err)
	nat.rule("direct, with a source that is not the uplink's: the uplink's address",
		cat(markIs(r.direct),
			one(&expr.Fib{Register: 1, FlagSADDR: true, FlagOIF: true, ResultADDRTYPE: true},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
				counter(), &expr.Masq{}))...)
	return err
}

// LAN extras allowed with the LAN: the limited broadcast, link-local
// multicast (mDNS, IGMPv3, LLMNR), SSDP, and IPv6 link-local unicast and
// link-scope multicast.
var lanExtras = []netip.Prefix{
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("224.0.0.0/24"),
	netip.MustParsePrefix("239.255.255.250/32"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff02::/16"),
}

// addKillSwitch queues the kill switch table's contents.
func addKillSwitch(c *nftables.Conn, r *resolved) error {
	var err error
	t := table(KillSwitchTable)
	ks := r.ks
	linkLocal6 := netip.MustParsePrefix("fe80::/10")

	out := baseChain(c, t, "output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter, &err)
	out.rule("loopback", cat(oifnameIs("lo"), one(accept()))...)
	out.rule("into the TUN", cat(oifnameIs(ks.tun), one(accept()))...)
	out.rule("mpvpn's own sockets", cat(markIs(r.own), one(accept()))...)
	out.rule("direct rules", cat(markIs(r.direct), one(accept()))...)
	out.rule("DHCPv4 client", cat(nfprotoIs(unix.NFPROTO_IPV4), port(unix.IPPROTO_UDP, sport, 68), port(unix.IPPROTO_UDP, dport, 67), one(accept()))...)
	out.rule("DHCPv6 client", cat(addrIn(false, linkLocal6), port(unix.IPPROTO_UDP, sport, 546), port(unix.IPPROTO_UDP, dport, 547), one(accept()))...)
	out.rule("NDP (hop limit 255: cannot be routed)", cat(hopLimitIs(255), out.icmpv6TypeIn(icmpv6RouterSolicit, icmpv6RouterAdvert, icmpv6NeighborSolicit, icmpv6NeighborAdvert, icmpv6Redirect), one(accept()))...)
	out.rule("MLD reports (hop limit 1: link only)", cat(hopLimitIs(1), out.icmpv6TypeIn(icmpv6MLDReport, icmpv6MLDDone, icmpv6MLD2Report), one(accept()))...)
	lanRules(out, ks)
	out.rule("anything else, TCP: a reset", cat(l4protoIs(unix.IPPROTO_TCP), one(counter(), rejectReset()))...)
	out.rule("anything else: ICMP admin-prohibited", counter(), rejectProhibited())

	fwd := baseChain(c, t, "forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter, &err)
	fwd.rule("into the TUN", cat(oifnameIs(ks.tun), one(accept()))...)
	fwd.rule("out of the TUN", cat(iifnameIs(ks.tun), one(accept()))...)
	fwd.rule("direct", cat(markIs(r.direct), one(accept()))...)
	lanRules(fwd, ks)
	fwd.rule("anything else, TCP: a reset", cat(l4protoIs(unix.IPPROTO_TCP), one(counter(), rejectReset()))...)
	fwd.rule("anything else: ICMP admin-prohibited", counter(), rejectProhibited())
	return err
}

func lanRules(b *builder, ks *resolvedKS) {
	if ks.lan == nil {
		return
	}
	// DNS goes through the tunnel even when the LAN is allowed.
	b.rule("DNS never to the LAN (TCP)", cat(port(unix.IPPROTO_TCP, dport, 53), one(counter(), rejectReset()))...)
	b.rule("DNS never to the LAN (UDP)", cat(port(unix.IPPROTO_UDP, dport, 53), one(counter(), rejectProhibited()))...)
	for _, p := range ks.lan {
		b.rule("LAN", cat(addrIn(true, p), one(accept()))...)
	}
	for _, p := range lanExtras {
		b.rule("LAN broadcast and link-local", cat(addrIn(true, p), one(accept()))...)
	}
}
