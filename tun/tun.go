//go:build linux

// Package tun opens and configures mpvpn's TUN device: the interface the
// routed applications' packets enter, handed to stack/ as a batched
// golang.zx2c4.com/wireguard/tun.Device.
package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// DefaultMTU is the TUN MTU when Config.MTU is 0.
//
// The TUN is local: the flows entering it end in this host's netstack, so
// its MTU never meets a real link and large is only a question of speed.
// With 65000 one read or write moves up to ~64 KiB of TCP payload, so the
// per-packet costs (syscall, gVisor's per-segment work, ACKs) are paid ~44
// times less often than at 1500. tun2socks measured 1.66 → 4.9 Gbit/s from
// that change alone; stack's BenchmarkStackThroughput (kernel TCP client →
// this TUN → netstack → loopback, 2 vCPUs, 2026-11) gives about 4.3 Gbit/s
// at 1500, 9-11 at 9000 and 14-16 at 65000, each way. It stays under 65535
// (the IPv4 total-length limit) with room for headers.
const DefaultMTU = 65000

// MinMTU is the smallest MTU Open accepts: IPv6 needs 1280 on every link,
// and gVisor's IPv6 refuses a smaller NIC.
const MinMTU = 1280

// MaxMTU is the largest MTU Open accepts: an IPv4 packet cannot be longer.
const MaxMTU = 65535

// Config describes the TUN device to create.
type Config struct {
	Name  string         // interface name, e.g. "mpvpn0" (at most 15 bytes)
	MTU   int            // 0 means DefaultMTU
	Addrs []netip.Prefix // addresses on the interface, e.g. 10.77.77.1/32
}

// Device is an open, configured and up TUN interface. Closing it deletes
// the interface (it is not persistent, so a crash cannot leave it behind).
type Device struct {
	inner wgtun.Device
	name  string
	mtu   int

	closeOnce sync.Once
	closeErr  error
}

// Name returns the interface name.
func (d *Device) Name() string { return d.name }

// MTU returns the interface MTU.
func (d *Device) MTU() int { return d.mtu }

// Inner returns the batched wireguard device (Read/Write/BatchSize) that
// stack.Config.Device takes.
func (d *Device) Inner() wgtun.Device { return d.inner }

// Close closes the device and so deletes the interface. It may be called
// more than once (stack.Stack.Close closes the inner device too, the only
// way to interrupt its blocked Read); later calls return the first
// result.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		if err := d.inner.Close(); err != nil {
			d.closeErr = fmt.Errorf("close TUN %s: %w", d.name, err)
		}
	})
	return d.closeErr
}

// withDefaults validates cfg and fills in its defaults.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	var errs []error
	// IFNAMSIZ is 16 with the terminating NUL; the kernel also rejects
	// '/', ':' and whitespace in names.
	switch {
	case cfg.Name == "":
		errs = append(errs, errors.New("no interface name"))
	case len(cfg.Name) > 15:
		errs = append(errs, fmt.Errorf("interface name %q is longer than 15 bytes", cfg.Name))
	case strings.ContainsAny(cfg.Name, "/: \t\n") || cfg.Name == "." || cfg.Name == "..":
		errs = append(errs, fmt.Errorf("interface name %q is not valid", cfg.Name))
	}
	if cfg.MTU < MinMTU || cfg.MTU > MaxMTU {
		errs = append(errs, fmt.Errorf("MTU %d is outside %d..%d", cfg.MTU, MinMTU, MaxMTU))
	}
	for _, p := range cfg.Addrs {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("address %v is not valid", p))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cfg, fmt.Errorf("TUN config: %w", err)
	}
	return cfg, nil
}

// Open creates the TUN device cfg describes with
// golang.zx2c4.com/wireguard/tun (which turns on IFF_VNET_HDR and the
// TSO/checksum offloads, so reads and writes move 64 KiB super-packets in
// batches), sets its MTU and addresses over netlink and brings it up. On
// error nothing is left behind.
func Open(cfg Config, log *slog.Logger) (*Device, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return open(cfg, log)
}
