package tun_test

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tun/tuntest"
)

func TestOpen(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	defer goleak.VerifyNone(t, ignore)
	ns := tuntest.NewNetNS(t)
	addrs := []netip.Prefix{netip.MustParsePrefix("10.77.77.1/32"), netip.MustParsePrefix("fd00:77::1/128")}

	var dev *tun.Device
	if err := ns.Do(func() (err error) {
		dev, err = tun.Open(tun.Config{Name: "mvtest0", Addrs: addrs}, nil)
		return err
	}); err != nil {
		tuntest.CannotRun(t, "open TUN: %v", err)
	}
	defer dev.Close()
	if dev.Name() != "mvtest0" || dev.MTU() != tun.DefaultMTU {
		t.Errorf("Name %q MTU %d, want mvtest0 %d", dev.Name(), dev.MTU(), tun.DefaultMTU)
	}
	if b := dev.Inner().BatchSize(); b <= 1 {
		t.Errorf("BatchSize %d: the offloads (IFF_VNET_HDR) are off", b)
	}

	err := ns.Do(func() error {
		link, err := netlink.LinkByName("mvtest0")
		if err != nil {
			return err
		}
		a := link.Attrs()
		if a.MTU != tun.DefaultMTU {
			t.Errorf("kernel MTU %d, want %d", a.MTU, tun.DefaultMTU)
		}
		if a.Flags&net.FlagUp == 0 {
			t.Errorf("interface is not up: %v", a.Flags)
		}
		list, err := netlink.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		var got []netip.Prefix
		for _, l := range list {
			ip, _ := netip.AddrFromSlice(l.IP)
			ones, _ := l.Mask.Size()
			got = append(got, netip.PrefixFrom(ip.Unmap(), ones))
			if l.Flags&unix.IFA_F_TENTATIVE != 0 {
				t.Errorf("%v is tentative (DAD was not skipped)", l.IPNet)
			}
		}
		for _, want := range addrs {
			if !slices.Contains(got, want) {
				t.Errorf("address %v missing; have %v", want, got)
			}
		}
		for _, p := range got {
			if p.Addr().IsLinkLocalUnicast() {
				t.Errorf("link-local address %v was generated", p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A second TUN of the same name is refused, and leaves the first.
	if err := ns.Do(func() error {
		d2, err := tun.Open(tun.Config{Name: "mvtest0"}, nil)
		if err == nil {
			d2.Close()
			return errors.New("second Open of the same name succeeded")
		}
		_, err = netlink.LinkByName("mvtest0")
		return err
	}); err != nil {
		t.Error(err)
	}

	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := dev.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := ns.Do(func() error {
		_, err := netlink.LinkByName("mvtest0")
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return errors.New("interface still there after Close")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

func TestOpenBadConfig(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  tun.Config
	}{
		{"no name", tun.Config{}},
		{"long name", tun.Config{Name: "mpvpn0123456789x"}},
		{"slash", tun.Config{Name: "a/b"}},
		{"MTU too small", tun.Config{Name: "mv0", MTU: 576}},
		{"MTU too large", tun.Config{Name: "mv0", MTU: 65536}},
		{"bad address", tun.Config{Name: "mv0", Addrs: []netip.Prefix{{}}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Validation comes first: nothing is created, so this needs
			// no namespace.
			if d, err := tun.Open(tt.cfg, nil); err == nil {
				d.Close()
				t.Fatal("Open succeeded")
			}
		})
	}
}
