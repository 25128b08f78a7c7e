//go:build linux

package routing

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Policy rules over rtnetlink (RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE),
// written here because vishvananda/netlink v1.3.1 cannot express them all
// (see rule). The message is a struct fib_rule_hdr, laid out as struct
// rtmsg, then FRA_* attributes (include/uapi/linux/fib_rules.h, Linux
// 6.18).

// fibRuleInvert is FIB_RULE_INVERT in fib_rule_hdr.flags.
const fibRuleInvert = 0x2

// kernel is one network namespace's rtnetlink, for routes (through
// vishvananda/netlink) and rules (through a socket of its own).
type kernel struct {
	nlh  *netlink.Handle
	sock *nl.SocketHandle
}

// rtnlTimeout bounds each request; the kernel answers at once.
const rtnlTimeout = 10 * time.Second

func openKernel(ns netns.NsHandle) (*kernel, error) {
	nlh, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink: %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		nlh.Close()
		return nil, fmt.Errorf("rtnetlink: %w", err)
	}
	tv := unix.NsecToTimeval(rtnlTimeout.Nanoseconds())
	_ = s.SetSendTimeout(&tv)
	_ = s.SetReceiveTimeout(&tv)
	_ = s.SetExtAck(true) // the kernel's own words in errors
	return &kernel{nlh: nlh, sock: &nl.SocketHandle{Socket: s}}, nil
}

func (k *kernel) close() {
	k.sock.Close()
	k.nlh.Close()
}

func (k *kernel) request(typ, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(typ, flags)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: k.sock}
	return req
}

func u32Attr(typ int, v uint32) *nl.RtAttr {
	return nl.NewRtAttr(typ, binary.NativeEndian.AppendUint32(nil, v))
}

// message encodes r for RTM_NEWRULE or RTM_DELRULE. Everything this
// package parses is written back, so a delete names the rule as fully as
// the kernel's rule_find compares it (it ignores `not`, Linux 6.18).
func (r rule) message(req *nl.NetlinkRequest) {
	hdr := &nl.RtMsg{RtMsg: unix.RtMsg{Family: uint8(r.family), Type: r.action}}
	if r.invert {
		hdr.Flags |= fibRuleInvert
	}
	if r.action == unix.FR_ACT_TO_TBL && r.table < 256 {
		hdr.Table = uint8(r.table)
	}
	var attrs []*nl.RtAttr
	if r.dst.IsValid() {
		hdr.Dst_len = uint8(r.dst.Bits())
		attrs = append(attrs, nl.NewRtAttr(unix.FRA_DST, r.dst.Addr().AsSlice()))
	}
	if r.src.IsValid() {
		hdr.Src_len = uint8(r.src.Bits())
		attrs = append(attrs, nl.NewRtAttr(unix.FRA_SRC, r.src.Addr().AsSlice()))
	}
	attrs = append(attrs, u32Attr(unix.FRA_PRIORITY, uint32(r.prio)))
	if r.hasMark {
		attrs = append(attrs, u32Attr(unix.FRA_FWMARK, r.mark), u32Attr(unix.FRA_FWMASK, r.mask))
	}
	if r.action == unix.FR_ACT_TO_TBL {
		attrs = append(attrs, u32Attr(unix.FRA_TABLE, uint32(r.table)))
	}
	if r.suppress >= 0 {
		attrs = append(attrs, u32Attr(unix.FRA_SUPPRESS_PREFIXLEN, uint32(r.suppress)))
	}
	if r.proto != 0 {
		attrs = append(attrs, nl.NewRtAttr(unix.FRA_PROTOCOL, []byte{r.proto}))
	}
	req.AddData(hdr)
	for _, a := range attrs {
		req.AddData(a)
	}
}

func (k *kernel) addRule(r rule) error {
	req := k.request(unix.RTM_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	r.message(req)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

func (k *kernel) delRule(r rule) error {
	req := k.request(unix.RTM_DELRULE, unix.NLM_F_ACK)
	r.message(req)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// dumpAttempts bounds how often a dump is read again when the kernel says
// the rules changed while it was read (NLM_F_DUMP_INTR).
const dumpAttempts = 3

// rules lists every rule of a family.
func (k *kernel) rules(family int) ([]rule, error) {
	for attempt := 1; ; attempt++ {
		req := k.request(unix.RTM_GETRULE, unix.NLM_F_DUMP)
		req.AddData(&nl.RtMsg{RtMsg: unix.RtMsg{Family: uint8(family)}})
		msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWRULE)
		if errors.Is(err, nl.ErrDumpInterrupted) && attempt < dumpAttempts {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list %s rules: %w", familyName(family), err)
		}
		out := make([]rule, 0, len(msgs))
		for _, m := range msgs {
			r, err := parseRule(m)
			if err != nil {
				return nil, fmt.Errorf("list %s rules: %w", familyName(family), err)
			}
			out = append(out, r)
		}
		return out, nil
	}
}

// parseRule decodes one RTM_NEWRULE message (after the netlink header).
func parseRule(b []byte) (rule, error) {
	if len(b) < unix.SizeofRtMsg {
		return rule{}, fmt.Errorf("short rule message (%d bytes)", len(b))
	}
	hdr := nl.DeserializeRtMsg(b)
	r := rule{
		family:   int(hdr.Family),
		action:   hdr.Type,
		table:    int(hdr.Table),
		invert:   hdr.Flags&fibRuleInvert != 0,
		suppress: -1,
	}
	if hdr.Tos != 0 {
		r.other = append(r.other, fmt.Sprintf("tos %#x", hdr.Tos))
	}
	attrs, err := nl.ParseRouteAttr(b[unix.SizeofRtMsg:])
	if err != nil {
		return rule{}, fmt.Errorf("bad rule message: %w", err)
	}
	u32 := func(v []byte) uint32 {
		if len(v) < 4 {
			return 0
		}
		return binary.NativeEndian.Uint32(v)
	}
	prefix := func(v []byte, bits uint8) netip.Prefix {
		a, ok := netip.AddrFromSlice(v)
		if !ok {
			return netip.Prefix{}
		}
		return netip.PrefixFrom(a, int(bits))
	}
	ifname := func(v []byte) string {
		for i, c := range v {
			if c == 0 {
				return string(v[:i])
			}
		}
		return string(v)
	}
	for _, a := range attrs {
		v := a.Value
		switch a.Attr.Type & nl.NLA_TYPE_MASK {
		case unix.FRA_PRIORITY:
			r.prio = int(u32(v))
		case unix.FRA_TABLE:
			r.table = int(u32(v))
		case unix.FRA_FWMARK:
			r.hasMark, r.mark = true, u32(v)
		case unix.FRA_FWMASK:
			r.hasMark, r.mask = true, u32(v)
		case unix.FRA_SRC:
			r.src = prefix(v, hdr.Src_len)
		case unix.FRA_DST:
			r.dst = prefix(v, hdr.Dst_len)
		case unix.FRA_SUPPRESS_PREFIXLEN:
			if n := u32(v); n != ^uint32(0) {
				r.suppress = int(n)
			}
		case unix.FRA_PROTOCOL:
			if len(v) > 0 {
				r.proto = v[0]
			}
		case unix.FRA_SUPPRESS_IFGROUP:
			if n := u32(v); n != ^uint32(0) {
				r.other = append(r.other, fmt.Sprintf("suppress_ifgroup %d", n))
			}
		case unix.FRA_IIFNAME:
			r.other = append(r.other, "iif "+ifname(v))
		case unix.FRA_OIFNAME:
			r.other = append(r.other, "oif "+ifname(v))
		case unix.FRA_GOTO:
			r.other = append(r.other, fmt.Sprintf("goto %d", u32(v)))
		case unix.FRA_FLOW:
			r.other = append(r.other, fmt.Sprintf("realms %d", u32(v)))
		case unix.FRA_TUN_ID:
			r.other = append(r.other, "tun_id")
		case unix.FRA_L3MDEV:
			if len(v) > 0 && v[0] != 0 {
				r.other = append(r.other, "l3mdev")
			}
		case unix.FRA_UID_RANGE:
			if len(v) >= 8 {
				r.other = append(r.other, fmt.Sprintf("uidrange %d-%d", u32(v), u32(v[4:])))
			}
		case unix.FRA_IP_PROTO:
			if len(v) > 0 {
				r.other = append(r.other, fmt.Sprintf("ipproto %d", v[0]))
			}
		case unix.FRA_SPORT_RANGE, unix.FRA_DPORT_RANGE:
			if len(v) >= 4 {
				what := "sport"
				if a.Attr.Type&nl.NLA_TYPE_MASK == unix.FRA_DPORT_RANGE {
					what = "dport"
				}
				ne := binary.NativeEndian
				r.other = append(r.other, fmt.Sprintf("%s %d-%d", what, ne.Uint16(v), ne.Uint16(v[2:])))
			}
		}
	}
	// A mark without a mask is matched whole (the kernel fills the mask
	// in on add, so this is for other writers' messages only).
	if r.hasMark && r.mask == 0 && r.mark != 0 {
		r.mask = ^uint32(0)
	}
	return r, nil
}
