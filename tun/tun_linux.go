package tun

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

func open(cfg Config, log *slog.Logger) (_ *Device, err error) {
	inner, err := wgtun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		return nil, fmt.Errorf("create TUN %s: %w", cfg.Name, err)
	}
	defer func() {
		if err != nil {
			inner.Close() // a non-persistent TUN disappears with its fd
		}
	}()
	name, err := inner.Name()
	if err != nil {
		return nil, fmt.Errorf("TUN %s: name: %w", cfg.Name, err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("TUN %s: %w", name, err)
	}
	// No IPv6 link-local address: nothing on a point-to-point TUN talks
	// to it, and without one the kernel sends no router solicitations or
	// MLD reports into the stack. Best effort: it fails where IPv6 is
	// disabled, which is fine too.
	if err := netlink.LinkSetIP6AddrGenMode(link, nl.IN6_ADDR_GEN_MODE_NONE); err != nil {
		log.Debug("TUN: cannot turn off IPv6 link-local address generation", "tun", name, "err", err)
	}
	// CreateTUN already set the MTU with an ioctl; this makes sure (and
	// says so in the error) rather than trusting it.
	if link.Attrs().MTU != cfg.MTU {
		if err := netlink.LinkSetMTU(link, cfg.MTU); err != nil {
			return nil, fmt.Errorf("TUN %s: set MTU %d: %w", name, cfg.MTU, err)
		}
	}
	for _, p := range cfg.Addrs {
		a := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			// DAD on a TUN only delays the address (tentative for a
			// second or more); there is nobody to collide with.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, a); err != nil {
			return nil, fmt.Errorf("TUN %s: add address %s: %w", name, p, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("TUN %s: set up: %w", name, err)
	}
	// BatchSize is 1 when the kernel refused IFF_VNET_HDR: everything
	// still works, one packet per syscall.
	log.Info("TUN up", "tun", name, "mtu", cfg.MTU, "addrs", fmt.Sprint(cfg.Addrs), "batch", inner.BatchSize())
	if inner.BatchSize() <= 1 {
		log.Warn("TUN without offloads (no IFF_VNET_HDR): one packet per syscall", "tun", name)
	}
	return &Device{inner: inner, name: name, mtu: cfg.MTU}, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
