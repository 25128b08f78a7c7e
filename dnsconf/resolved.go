//go:build linux

package dnsconf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// systemd-resolved's D-Bus API (org.freedesktop.resolve1(5)).
const (
	resolvedName  = "org.freedesktop.resolve1"
	resolvedPath  = dbus.ObjectPath("/org/freedesktop/resolve1")
	resolvedIface = "org.freedesktop.resolve1.Manager"

	errUnknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"
	errNoSuchLink    = "org.freedesktop.resolve1.NoSuchLink"
)

// dbusTimeout bounds each D-Bus call: a hung bus or resolved must not hang
// the client's start or stop.
const dbusTimeout = 10 * time.Second

// linkDNS is one element of SetLinkDNS's a(iay): an address family
// (AF_INET, AF_INET6) and the address's 4 or 16 bytes.
type linkDNS struct {
	Family  int32
	Address []byte
}

// linkDomain is one element of SetLinkDomains's a(sb).
type linkDomain struct {
	Domain    string
	RouteOnly bool
}

// resolvedRunning says whether systemd-resolved owns its name on the
// system bus (DBUS_SYSTEM_BUS_ADDRESS, else the standard socket). An error
// means the bus itself could not be asked.
func resolvedRunning() (bool, error) {
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		return false, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), dbusTimeout)
	defer cancel()
	var has bool
	err = conn.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.NameHasOwner", 0, resolvedName).Store(&has)
	if err != nil {
		return false, fmt.Errorf("NameHasOwner %s: %w", resolvedName, err)
	}
	return has, nil
}

func prepareResolved(link string, servers []netip.Addr) (State, error) {
	if link == "" {
		return State{}, errors.New("dnsconf: systemd-resolved: no link (the TUN's interface name) to configure")
	}
	l, err := netlink.LinkByName(link)
	if err != nil {
		return State{}, fmt.Errorf("dnsconf: systemd-resolved: link %s: %w", link, err)
	}
	// The zone of a link-local server is dropped: resolved's per-link
	// servers are reached over that link anyway.
	plain := make([]netip.Addr, len(servers))
	for i, a := range servers {
		plain[i] = a.WithZone("")
	}
	return State{Backend: Resolved, Servers: plain, Link: link, Ifindex: l.Attrs().Index}, nil
}

func applyResolved(st State, log *slog.Logger) error {
	// The ifindex was journalled at Prepare; a TUN recreated since under
	// the same name would have another one, and the journal would not
	// name it.
	if err := sameLink(st); err != nil {
		return fmt.Errorf("dnsconf: systemd-resolved: %w", err)
	}
	if len(st.Servers) == 0 {
		return errors.New("dnsconf: systemd-resolved: the state names no DNS servers")
	}
	dns := make([]linkDNS, len(st.Servers))
	for i, a := range st.Servers {
		if a.Is4() {
			b := a.As4()
			dns[i] = linkDNS{unix.AF_INET, b[:]}
		} else {
			b := a.As16()
			dns[i] = linkDNS{unix.AF_INET6, b[:]}
		}
	}
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		return fmt.Errorf("dnsconf: systemd-resolved: system bus: %w", err)
	}
	defer conn.Close()
	obj := conn.Object(resolvedName, resolvedPath)
	idx := int32(st.Ifindex)

	if err := call(obj, "SetLinkDNS", idx, dns); err != nil {
		return fmt.Errorf("dnsconf: systemd-resolved: SetLinkDNS on %s: %w", st.Link, err)
	}
	// "~." is a routing-only domain matching every name: resolved sends
	// all queries to this link's servers, not only those for a search
	// domain, and the TUN's servers win over the uplinks'.
	if err := call(obj, "SetLinkDomains", idx, []linkDomain{{"~.", true}}); err != nil {
		return fmt.Errorf("dnsconf: systemd-resolved: SetLinkDomains on %s: %w", st.Link, err)
	}
	// The default route makes the link a candidate for names no link's
	// domains match. resolved before v240 lacks the method; there "~."
	// alone does the job.
	if err := call(obj, "SetLinkDefaultRoute", idx, true); err != nil {
		var de dbus.Error
		if !errors.As(err, &de) || de.Name != errUnknownMethod {
			return fmt.Errorf("dnsconf: systemd-resolved: SetLinkDefaultRoute on %s: %w", st.Link, err)
		}
		log.Info("dnsconf: systemd-resolved has no SetLinkDefaultRoute (older than v240); relying on the ~. domain", "link", st.Link)
	}
	log.Info("dnsconf: systemd-resolved sends DNS to mpvpn", "link", st.Link, "ifindex", st.Ifindex, "servers", st.Servers)
	return nil
}

func undoResolved(st State, log *slog.Logger) (string, error) {
	// resolved drops a link's settings when the link goes away, so a TUN
	// gone with a crashed client leaves nothing to undo. A link that now
	// has another name is not the one mpvpn configured.
	if err := sameLink(st); err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, errOtherLink) {
			log.Debug("dnsconf: resolved link gone", "err", err)
			return fmt.Sprintf("systemd-resolved: link %s (ifindex %d) is gone; nothing to undo", st.Link, st.Ifindex), nil
		}
		return "", fmt.Errorf("dnsconf: systemd-resolved: %w", err)
	}
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		return "", fmt.Errorf("dnsconf: systemd-resolved: cannot revert link %s: system bus: %w", st.Link, err)
	}
	defer conn.Close()
	err = call(conn.Object(resolvedName, resolvedPath), "RevertLink", int32(st.Ifindex))
	var de dbus.Error
	if errors.As(err, &de) && de.Name == errNoSuchLink {
		return fmt.Sprintf("systemd-resolved: link %s is gone; nothing to undo", st.Link), nil
	}
	if err != nil {
		return "", fmt.Errorf("dnsconf: systemd-resolved: RevertLink on %s: %w", st.Link, err)
	}
	return fmt.Sprintf("systemd-resolved: reverted the DNS settings of link %s", st.Link), nil
}

var errOtherLink = errors.New("the ifindex now belongs to another link")

// sameLink checks that st.Ifindex is still the link named st.Link.
func sameLink(st State) error {
	if st.Ifindex <= 0 {
		return fmt.Errorf("link %s: no ifindex in the state", st.Link)
	}
	l, err := netlink.LinkByIndex(st.Ifindex)
	if err != nil {
		return fmt.Errorf("link %s (ifindex %d): %w", st.Link, st.Ifindex, err)
	}
	if name := l.Attrs().Name; name != st.Link {
		return fmt.Errorf("link %s (ifindex %d): %w (%s)", st.Link, st.Ifindex, errOtherLink, name)
	}
	return nil
}

func call(obj dbus.BusObject, method string, args ...any) error {
	ctx, cancel := context.WithTimeout(context.Background(), dbusTimeout)
	defer cancel()
	return obj.CallWithContext(ctx, resolvedIface+"."+method, 0, args...).Err
}

// warnResolvConf logs when resolv.conf does not send programs to
// resolved's stub (or its generated file): then the link's settings reach
// programs that use resolved's API (nss-resolve) but not those that read
// the file. This is only a hint; nothing is changed.
func warnResolvConf(path string, log *slog.Logger) {
	if target, err := filepath.EvalSymlinks(path); err == nil && strings.HasPrefix(target, "/run/systemd/resolve/") {
		return
	}
	b, err := os.ReadFile(path)
	if err != nil || bytes.Contains(b, []byte("127.0.0.53")) || bytes.Contains(b, []byte("127.0.0.54")) {
		return
	}
	log.Warn("dnsconf: systemd-resolved runs but resolv.conf does not point at it; programs reading the file bypass mpvpn's DNS", "path", path)
}
