//go:build linux

// Package dnsconf points the host's system resolver at mpvpn's own DNS
// resolver (addresses inside the TUN) while the client runs, and puts it
// back exactly afterwards, after a crash (kill -9) too.
//
// There are two backends, as Tailscale has on Linux:
//
//   - systemd-resolved, over D-Bus, when org.freedesktop.resolve1 has an
//     owner on the system bus: the TUN's link gets mpvpn's servers, the
//     routing-only domain "~." (so every query goes to them) and the
//     default route; undoing is RevertLink. resolved forgets a link when
//     it goes away, so after a crash, with the TUN gone, there is nothing
//     left to undo.
//   - /etc/resolv.conf otherwise: mpvpn writes its own file and later puts
//     back the original byte for byte (content, mode, owner; a symlink as
//     the same symlink; a missing file as no file). A file that is a mount
//     point (a bind mount under `ip netns exec`, or a container's) is
//     written in place, as rename(2) over it fails with EBUSY.
//
// # Prepare, journal, Apply, Undo
//
// Prepare decides the backend and reads what is there now without changing
// anything; it returns a State, which is self-contained and JSON-encodable.
// The caller writes the State to its journal (package internal/journal),
// durably, and only then calls Apply. Undo takes the same State, from the
// running client or from the journal of a run that crashed, and is
// idempotent: it may run for a change that never happened (a crash between
// the journal and Apply), or twice.
//
// mpvpn never undoes anybody else's change: a resolv.conf rewritten since
// by somebody else (a DHCP client, NetworkManager) is left as it is, and
// Undo says so.
package dnsconf

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
)

// Mode selects the backend.
type Mode string

const (
	Auto     Mode = "auto"        // systemd-resolved if it runs, else the file
	Resolved Mode = "resolved"    // systemd-resolved over D-Bus, or an error
	File     Mode = "resolv.conf" // the resolv.conf file
	Off      Mode = "off"         // leave the host's DNS alone
)

// DefaultPath is the resolv.conf the file backend writes when Config.Path
// is empty.
const DefaultPath = "/etc/resolv.conf"

// ParseMode parses a mode as the command line and the TOML file spell it.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case Auto, Resolved, File, Off:
		return m, nil
	}
	return "", fmt.Errorf("dnsconf: unknown DNS mode %q (want %s, %s, %s or %s)", s, Auto, Resolved, File, Off)
}

// Config says what to set up.
type Config struct {
	Mode Mode // "" is Auto

	// Link is the TUN's interface name. The resolved backend configures
	// this link; it must exist when Prepare runs, as its ifindex goes
	// into the State.
	Link string

	// Servers are mpvpn's resolver addresses, in order of preference.
	Servers []netip.Addr

	// Path is the resolv.conf the file backend manages; "" is DefaultPath.
	// Tests point it elsewhere.
	Path string

	Logger *slog.Logger
}

// State is what Apply changes and Undo puts back. It must be journalled
// before Apply runs. It is self-contained (Undo needs nothing else) and
// JSON-serialisable; the byte slices become base64.
type State struct {
	Backend Mode         `json:"backend"` // Resolved, File or Off; never Auto
	Servers []netip.Addr `json:"servers,omitempty"`

	// The resolved backend: the link and the ifindex it had at Prepare.
	// Undo reverts the link only while that ifindex still has that name,
	// so that a later device given the same index is not touched.
	Link    string `json:"link,omitempty"`
	Ifindex int    `json:"ifindex,omitempty"`

	// The file backend: the file and what was there before.
	Path    string `json:"path,omitempty"`
	Existed bool   `json:"existed,omitempty"` // false: there was no file
	Symlink string `json:"symlink,omitempty"` // the target, when it was a symlink
	Before  []byte `json:"before,omitempty"`  // the content, when it was a regular file
	Perm    uint32 `json:"perm,omitempty"`    // its st_mode & 07777
	UID     int    `json:"uid,omitempty"`     // its owner
	GID     int    `json:"gid,omitempty"`
	Wrote   []byte `json:"wrote,omitempty"` // what Apply writes: Undo restores only over this
}

// Prepare decides the backend and reads what is there now, changing
// nothing. The State it returns is to be journalled before Apply.
func Prepare(cfg Config) (State, error) {
	log := logger(cfg.Logger)
	mode := cfg.Mode
	if mode == "" {
		mode = Auto
	}
	if _, err := ParseMode(string(mode)); err != nil {
		return State{}, err
	}
	if mode == Off {
		return State{Backend: Off}, nil
	}
	servers, err := checkServers(cfg.Servers)
	if err != nil {
		return State{}, err
	}
	path := cfg.Path
	if path == "" {
		path = DefaultPath
	}

	foreign := ownNetns()
	if foreign && mode == Resolved {
		return State{}, fmt.Errorf("dnsconf: DNS mode %s: this client runs in a network namespace of its own, and systemd-resolved serves the host's", Resolved)
	}
	if foreign && hostsFile(path) {
		msg := fmt.Sprintf("this client runs in a network namespace of its own, but %s is the host's: give the namespace its own (ip netns exec mounts /etc/netns/NAME/resolv.conf over it), or turn the DNS hook off", path)
		if mode == Auto {
			log.Warn("dnsconf: not pointing the system's DNS at mpvpn: " + msg)
			return State{Backend: Off}, nil
		}
		return State{}, errors.New("dnsconf: " + msg)
	}
	if mode == Auto && !foreign || mode == Resolved {
		running, err := resolvedRunning()
		switch {
		case running:
			warnResolvConf(path, log)
			return prepareResolved(cfg.Link, servers)
		case mode == Resolved && err != nil:
			return State{}, fmt.Errorf("dnsconf: DNS mode %s: cannot reach the system bus to find systemd-resolved: %w", Resolved, err)
		case mode == Resolved:
			return State{}, fmt.Errorf("dnsconf: DNS mode %s: systemd-resolved is not running (%s has no owner on the system bus)", Resolved, resolvedName)
		case err != nil:
			log.Debug("dnsconf: no system bus; using the resolv.conf file", "path", path, "err", err)
		default:
			log.Debug("dnsconf: systemd-resolved is not running; using the resolv.conf file", "path", path)
		}
	}
	return prepareFile(path, servers, log)
}

// Apply makes the change st describes. Call it only once st is in the
// journal. On error part of the change may have been made: Undo(st)
// still puts everything back.
func Apply(st State, log *slog.Logger) error {
	log = logger(log)
	switch st.Backend {
	case Off:
		return nil
	case Resolved:
		return applyResolved(st, log)
	case File:
		return applyFile(st, log)
	}
	return fmt.Errorf("dnsconf: apply: unknown backend %q", st.Backend)
}

// Undo puts back what st says, for a clean stop, `mpvpn down`, or the next
// start after a crash. It is idempotent. It returns one line saying what
// it did, also when that was nothing or when it left somebody else's
// change alone; an error means the original could not be put back.
func Undo(st State, log *slog.Logger) (string, error) {
	log = logger(log)
	switch st.Backend {
	case Off:
		return "DNS was left alone (mode off): nothing to undo", nil
	case Resolved:
		return undoResolved(st, log)
	case File:
		return undoFile(st, log)
	}
	return "", fmt.Errorf("dnsconf: undo: unknown backend %q", st.Backend)
}

// checkServers refuses an empty or invalid list, and unmaps IPv4-mapped
// IPv6 addresses, which both backends would otherwise hand over as IPv6.
func checkServers(in []netip.Addr) ([]netip.Addr, error) {
	if len(in) == 0 {
		return nil, errors.New("dnsconf: no DNS server addresses to point the resolver at")
	}
	out := make([]netip.Addr, 0, len(in))
	for _, a := range in {
		if !a.IsValid() {
			return nil, errors.New("dnsconf: an invalid (zero) DNS server address")
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
