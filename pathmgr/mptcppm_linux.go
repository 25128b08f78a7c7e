package pathmgr

// A small client for the kernel's in-kernel MPTCP path manager, the generic
// netlink family "mptcp_pm" (include/uapi/linux/mptcp_pm.h, checked against
// Linux 6.18 and iproute2 ip/ipmptcp.c). vishvananda/netlink has no MPTCP
// support (v1.3.1, 2025), but it exports the generic netlink plumbing this
// needs: family resolution, request framing and attribute encoding.

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	pmFamilyName = "mptcp_pm"
	pmVersion    = 1 // MPTCP_PM_VER

	// Commands (enum mptcp_pm_command).
	pmCmdAddAddr   = 1
	pmCmdDelAddr   = 2
	pmCmdGetAddr   = 3
	pmCmdFlush     = 4
	pmCmdSetLimits = 5
	pmCmdGetLimits = 6
	pmCmdSetFlags  = 7

	// Top-level attributes (MPTCP_PM_ATTR_*); the limits are plain u32s,
	// not nested.
	pmAttrAddr        = 1
	pmAttrRcvAddAddrs = 2
	pmAttrSubflows    = 3

	// Attributes nested in pmAttrAddr (MPTCP_PM_ADDR_ATTR_*).
	pmAddrFamily = 1 // u16
	pmAddrID     = 2 // u8
	pmAddrAddr4  = 3 // 4 bytes, network order
	pmAddrAddr6  = 4 // 16 bytes
	pmAddrPort   = 5 // u16 in *host* order: the kernel does htons(nla_get_u16())
	pmAddrFlags  = 6 // u32
	pmAddrIfIdx  = 7 // s32
)

// EndpointFlags are the MPTCP_PM_ADDR_FLAG_* bits of an endpoint.
type EndpointFlags uint32

const (
	// FlagSignal announces the address to the peer (ADD_ADDR).
	FlagSignal EndpointFlags = 0x1
	// FlagSubflow opens a subflow from the address to the peer.
	FlagSubflow EndpointFlags = 0x2
	// FlagBackup marks the subflows from the address as backup: data goes
	// there only when no other subflow works. It can be changed on a live
	// endpoint (SetEndpointFlags), which sends MP_PRIO on its subflows.
	FlagBackup EndpointFlags = 0x4
	// FlagFullmesh opens a subflow to every known peer address.
	FlagFullmesh EndpointFlags = 0x8
	// FlagImplicit marks an endpoint the kernel created itself for a
	// subflow's local address; user space cannot add one.
	FlagImplicit EndpointFlags = 0x10
	// FlagLaminar (Linux 6.18) lets subflows to announced addresses use
	// this endpoint.
	FlagLaminar EndpointFlags = 0x20
)

var flagNames = []struct {
	f    EndpointFlags
	name string
}{
	{FlagSignal, "signal"}, {FlagSubflow, "subflow"}, {FlagBackup, "backup"},
	{FlagFullmesh, "fullmesh"}, {FlagImplicit, "implicit"}, {FlagLaminar, "laminar"},
}

// String spells the flags as `ip mptcp endpoint` does, e.g. "subflow backup".
func (f EndpointFlags) String() string {
	var parts []string
	for _, n := range flagNames {
		if f&n.f != 0 {
			parts = append(parts, n.name)
			f &^= n.f
		}
	}
	if f != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint32(f)))
	}
	return strings.Join(parts, " ")
}

// Endpoint is one entry of the path manager's local address list.
type Endpoint struct {
	// ID is the endpoint id (1-255). In AddEndpoint, 0 lets the kernel pick.
	ID      uint8
	Addr    netip.Addr
	Port    uint16 // only with FlagSignal and without FlagSubflow
	Flags   EndpointFlags
	IfIndex int // the `dev`: subflows from this endpoint are bound to it; 0 = none
}

func (e Endpoint) String() string {
	s := fmt.Sprintf("%s id %d %s", e.Addr, e.ID, e.Flags)
	if e.Port != 0 {
		s += fmt.Sprintf(" port %d", e.Port)
	}
	if e.IfIndex != 0 {
		s += fmt.Sprintf(" ifindex %d", e.IfIndex)
	}
	return s
}

// Limits are the path manager's per-netns limits (`ip mptcp limits`).
type Limits struct {
	// Subflows is the most additional subflows one connection may have
	// (the kernel's default is 2).
	Subflows uint32
	// AddAddrAccepted is the most ADD_ADDR announcements from the peer
	// one connection acts upon (default 0).
	AddAddrAccepted uint32
}

// PM talks to the in-kernel MPTCP path manager of one network namespace.
// Its methods may be called from any goroutine.
type PM struct {
	family uint16
	mu     sync.Mutex // one request at a time on the socket
	sock   *nl.SocketHandle
}

// pmTimeout bounds each request; the kernel answers at once, so only a
// bug (or a wedged kernel) waits this long.
const pmTimeout = 10 * time.Second

// OpenPM opens a path manager client in the network namespace ns, or in the
// calling thread's namespace when ns is netns.None(). The socket stays in
// that namespace whatever thread later uses it.
func OpenPM(ns netns.NsHandle) (*PM, error) {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("mptcp_pm: open generic netlink: %w", err)
	}
	fam, err := h.GenlFamilyGet(pmFamilyName)
	h.Close()
	if err != nil {
		return nil, fmt.Errorf("mptcp_pm: the kernel has no MPTCP path manager (CONFIG_MPTCP, Linux 5.7+): %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("mptcp_pm: open generic netlink: %w", err)
	}
	tv := unix.NsecToTimeval(pmTimeout.Nanoseconds())
	_ = s.SetSendTimeout(&tv)
	_ = s.SetReceiveTimeout(&tv)
	// Extended acks carry the kernel's own explanation ("limit greater
	// than maximum (8)", "address not found") into the error.
	_ = s.SetExtAck(true)
	return &PM{family: fam.ID, sock: &nl.SocketHandle{Socket: s}}, nil
}

// Close releases the socket.
func (p *PM) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sock != nil {
		p.sock.Close()
		p.sock = nil
	}
	return nil
}

// genlHeader is struct genlmsghdr: command, version and two reserved
// bytes. Not nl.Genlmsg, whose Serialize (v1.3.1) reads SizeofGenlmsg (4)
// bytes from its 2-byte struct, i.e. past the end of the object: the race
// detector reports it as a race with whatever was allocated next to it,
// and without -race the reserved field carries whatever that was.
type genlHeader struct{ cmd, version uint8 }

func (h genlHeader) Len() int          { return nl.SizeofGenlmsg }
func (h genlHeader) Serialize() []byte { return []byte{h.cmd, h.version, 0, 0} }

// exec sends one command with the given attributes and returns the
// payloads (after the genl header) of the replies.
func (p *PM) exec(cmd uint8, flags int, attrs ...*nl.RtAttr) ([][]byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sock == nil {
		return nil, errors.New("mptcp_pm: client is closed")
	}
	req := nl.NewNetlinkRequest(int(p.family), flags)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_GENERIC: p.sock}
	req.AddData(genlHeader{cmd: cmd, version: pmVersion})
	for _, a := range attrs {
		req.AddData(a)
	}
	msgs, err := req.Execute(unix.NETLINK_GENERIC, 0)
	if err != nil {
		return nil, err
	}
	out := make([][]byte, 0, len(msgs))
	for _, m := range msgs {
		if len(m) < nl.SizeofGenlmsg {
			return nil, fmt.Errorf("mptcp_pm: short reply (%d bytes)", len(m))
		}
		out = append(out, m[nl.SizeofGenlmsg:])
	}
	return out, nil
}

// encodeAddr builds the nested MPTCP_PM_ATTR_ADDR. The ID attribute is sent
// only when withID: its mere presence turns off the kernel's id allocation
// in ADD_ADDR (mptcp_pm_has_addr_attr_id, Linux 6.x).
func encodeAddr(e Endpoint, withID, withFlags bool) *nl.RtAttr {
	a := nl.NewRtAttr(int(unix.NLA_F_NESTED|pmAttrAddr), nil)
	if e.Addr.IsValid() {
		addr := e.Addr.Unmap()
		if addr.Is4() {
			a.AddRtAttr(pmAddrFamily, nl.Uint16Attr(unix.AF_INET))
			b := addr.As4()
			a.AddRtAttr(pmAddrAddr4, b[:])
		} else {
			a.AddRtAttr(pmAddrFamily, nl.Uint16Attr(unix.AF_INET6))
			b := addr.As16()
			a.AddRtAttr(pmAddrAddr6, b[:])
		}
	}
	if withID {
		a.AddRtAttr(pmAddrID, nl.Uint8Attr(e.ID))
	}
	if e.Port != 0 {
		a.AddRtAttr(pmAddrPort, nl.Uint16Attr(e.Port)) // host order, see pmAddrPort
	}
	if withFlags {
		a.AddRtAttr(pmAddrFlags, nl.Uint32Attr(uint32(e.Flags)))
	}
	if e.IfIndex != 0 {
		a.AddRtAttr(pmAddrIfIdx, nl.Uint32Attr(uint32(int32(e.IfIndex))))
	}
	return a
}

// decodeAddr parses one GET_ADDR reply payload.
func decodeAddr(payload []byte) (Endpoint, error) {
	attrs, err := nl.ParseRouteAttr(payload)
	if err != nil {
		return Endpoint{}, fmt.Errorf("mptcp_pm: bad reply: %w", err)
	}
	for _, a := range attrs {
		if a.Attr.Type&nl.NLA_TYPE_MASK != pmAttrAddr {
			continue
		}
		nested, err := nl.ParseRouteAttr(a.Value)
		if err != nil {
			return Endpoint{}, fmt.Errorf("mptcp_pm: bad address in reply: %w", err)
		}
		var e Endpoint
		ne := nl.NativeEndian()
		for _, n := range nested {
			v := n.Value
			switch n.Attr.Type & nl.NLA_TYPE_MASK {
			case pmAddrID:
				if len(v) >= 1 {
					e.ID = v[0]
				}
			case pmAddrAddr4:
				if len(v) >= 4 {
					e.Addr = netip.AddrFrom4([4]byte(v[:4]))
				}
			case pmAddrAddr6:
				if len(v) >= 16 {
					e.Addr = netip.AddrFrom16([16]byte(v[:16]))
				}
			case pmAddrPort:
				if len(v) >= 2 {
					e.Port = ne.Uint16(v)
				}
			case pmAddrFlags:
				if len(v) >= 4 {
					e.Flags = EndpointFlags(ne.Uint32(v))
				}
			case pmAddrIfIdx:
				if len(v) >= 4 {
					e.IfIndex = int(int32(ne.Uint32(v)))
				}
			}
		}
		return e, nil
	}
	return Endpoint{}, errors.New("mptcp_pm: reply without an address")
}

// AddEndpoint adds an endpoint (`ip mptcp endpoint add`). With e.ID 0 the
// kernel picks the id. It returns the endpoint as the kernel now holds it,
// read back with a dump. A second endpoint for the same address fails
// with an error wrapping syscall.EEXIST; a ninth one with syscall.ERANGE.
func (p *PM) AddEndpoint(e Endpoint) (Endpoint, error) {
	if !e.Addr.IsValid() {
		return Endpoint{}, errors.New("mptcp_pm: add endpoint: no address")
	}
	e.Addr = e.Addr.Unmap()
	if e.Port != 0 && e.Flags&(FlagSignal|FlagSubflow) != FlagSignal {
		return Endpoint{}, fmt.Errorf("mptcp_pm: add endpoint %s: a port needs the signal flag without subflow: %w", e.Addr, syscall.EINVAL)
	}
	if _, err := p.exec(pmCmdAddAddr, unix.NLM_F_ACK, encodeAddr(e, e.ID != 0, true)); err != nil {
		switch {
		case errors.Is(err, syscall.EEXIST):
			return Endpoint{}, fmt.Errorf("mptcp_pm: an MPTCP endpoint for %s already exists: %w", e.Addr, err)
		case errors.Is(err, syscall.ERANGE):
			return Endpoint{}, fmt.Errorf("mptcp_pm: add endpoint %s: the kernel holds at most %d MPTCP endpoints per network namespace: %w", e.Addr, MaxEndpoints, err)
		case errors.Is(err, syscall.EBUSY):
			return Endpoint{}, fmt.Errorf("mptcp_pm: add endpoint %s: id %d is taken: %w", e.Addr, e.ID, err)
		}
		return Endpoint{}, fmt.Errorf("mptcp_pm: add endpoint %s: %w", e.Addr, err)
	}
	eps, err := p.Endpoints()
	if err != nil {
		return Endpoint{}, err
	}
	for _, got := range eps {
		if got.Addr == e.Addr && (e.Port == 0 || got.Port == e.Port) {
			return got, nil
		}
	}
	return Endpoint{}, fmt.Errorf("mptcp_pm: endpoint %s was added but is not in the dump", e.Addr)
}

// DelEndpoint removes an endpoint by id (`ip mptcp endpoint delete id N`),
// closing the subflows that use it and announcing RM_ADDR to peers.
func (p *PM) DelEndpoint(id uint8) error {
	if id == 0 {
		// Id 0 names the initial subflow's address of each connection,
		// not an endpoint; the kernel would treat it specially.
		return fmt.Errorf("mptcp_pm: delete endpoint: id 0 is not an endpoint: %w", syscall.EINVAL)
	}
	if _, err := p.exec(pmCmdDelAddr, unix.NLM_F_ACK, encodeAddr(Endpoint{ID: id}, true, false)); err != nil {
		return fmt.Errorf("mptcp_pm: delete endpoint id %d: %w", id, err)
	}
	return nil
}

// Endpoint returns the endpoint with the given id.
func (p *PM) Endpoint(id uint8) (Endpoint, error) {
	msgs, err := p.exec(pmCmdGetAddr, 0, encodeAddr(Endpoint{ID: id}, true, false))
	if err != nil {
		return Endpoint{}, fmt.Errorf("mptcp_pm: get endpoint id %d: %w", id, err)
	}
	if len(msgs) == 0 {
		return Endpoint{}, fmt.Errorf("mptcp_pm: get endpoint id %d: empty reply", id)
	}
	return decodeAddr(msgs[0])
}

// Endpoints lists all endpoints (`ip mptcp endpoint show`), by id.
func (p *PM) Endpoints() ([]Endpoint, error) {
	msgs, err := p.exec(pmCmdGetAddr, unix.NLM_F_DUMP)
	if err != nil {
		return nil, fmt.Errorf("mptcp_pm: list endpoints: %w", err)
	}
	eps := make([]Endpoint, 0, len(msgs))
	for _, m := range msgs {
		e, err := decodeAddr(m)
		if err != nil {
			return nil, err
		}
		eps = append(eps, e)
	}
	return eps, nil
}

// FlushEndpoints removes every endpoint of the namespace, mpvpn's or not.
// Note that the kernel also resets add_addr_accepted to 0 on a flush
// (__reset_counters, Linux 6.x), so limits must be set again after it.
func (p *PM) FlushEndpoints() error {
	if _, err := p.exec(pmCmdFlush, unix.NLM_F_ACK); err != nil {
		return fmt.Errorf("mptcp_pm: flush endpoints: %w", err)
	}
	return nil
}

// SetEndpointFlags sets the changeable flags of endpoint id: FlagBackup and
// FlagFullmesh take the values in flags, the others are kept (the kernel
// ignores them). Toggling backup sends MP_PRIO on live subflows.
func (p *PM) SetEndpointFlags(id uint8, flags EndpointFlags) error {
	if id == 0 {
		return fmt.Errorf("mptcp_pm: set flags: id 0 is not an endpoint: %w", syscall.EINVAL)
	}
	if _, err := p.exec(pmCmdSetFlags, unix.NLM_F_ACK, encodeAddr(Endpoint{ID: id, Flags: flags}, true, true)); err != nil {
		return fmt.Errorf("mptcp_pm: set flags of endpoint id %d to %q: %w", id, flags, err)
	}
	return nil
}

// Limits returns the namespace's limits.
func (p *PM) Limits() (Limits, error) {
	msgs, err := p.exec(pmCmdGetLimits, 0)
	if err != nil {
		return Limits{}, fmt.Errorf("mptcp_pm: get limits: %w", err)
	}
	if len(msgs) == 0 {
		return Limits{}, errors.New("mptcp_pm: get limits: empty reply")
	}
	attrs, err := nl.ParseRouteAttr(msgs[0])
	if err != nil {
		return Limits{}, fmt.Errorf("mptcp_pm: get limits: bad reply: %w", err)
	}
	var l Limits
	for _, a := range attrs {
		if len(a.Value) < 4 {
			continue
		}
		switch a.Attr.Type & nl.NLA_TYPE_MASK {
		case pmAttrRcvAddAddrs:
			l.AddAddrAccepted = nl.NativeEndian().Uint32(a.Value)
		case pmAttrSubflows:
			l.Subflows = nl.NativeEndian().Uint32(a.Value)
		}
	}
	return l, nil
}

// SetLimits sets both limits; each must be at most MaxEndpoints.
func (p *PM) SetLimits(l Limits) error {
	if l.Subflows > MaxEndpoints || l.AddAddrAccepted > MaxEndpoints {
		return fmt.Errorf("mptcp_pm: limits subflows %d add_addr_accepted %d: the kernel allows at most %d each: %w",
			l.Subflows, l.AddAddrAccepted, MaxEndpoints, syscall.EINVAL)
	}
	if err := p.setLimits(l); err != nil {
		return fmt.Errorf("mptcp_pm: set limits subflows %d add_addr_accepted %d: %w", l.Subflows, l.AddAddrAccepted, err)
	}
	return nil
}

// setLimits sends SET_LIMITS without the client-side check, so tests can
// see the kernel refuse too.
func (p *PM) setLimits(l Limits) error {
	_, err := p.exec(pmCmdSetLimits, unix.NLM_F_ACK,
		nl.NewRtAttr(pmAttrRcvAddAddrs, nl.Uint32Attr(l.AddAddrAccepted)),
		nl.NewRtAttr(pmAttrSubflows, nl.Uint32Attr(l.Subflows)))
	return err
}
