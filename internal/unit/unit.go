//go:build linux

// Package unit writes the systemd service units `mpvpn install` puts in
// /etc/systemd/system: the text of each directive and the reason for it,
// in one place, so that the sandbox is read (and reviewed) as a whole.
package unit

import (
	"bytes"
	"fmt"
	"strings"
	"text/template"
)

// Marker begins the first line of every file `mpvpn install` writes (the
// unit and the configuration): it is how install and uninstall tell their
// own files from an administrator's, which they never overwrite or remove
// unasked.
const Marker = "# Written by `mpvpn install"

// Ours reports whether a file's content begins with Marker.
func Ours(content []byte) bool {
	return bytes.HasPrefix(content, []byte(Marker))
}

// Name is the unit's file name: mpvpn-client.service or mpvpn-server.service.
func Name(role string) string { return "mpvpn-" + role + ".service" }

// Spec is what varies between the units.
type Spec struct {
	Role   string // "client" or "server"
	Exec   string // absolute path of the mpvpn binary
	Config string // the TOML file given to --config
	// BindLowPort: the daemon listens on a port below 1024 (the server's
	// --listen, either's --metrics), which needs CAP_NET_BIND_SERVICE.
	BindLowPort bool
}

// Capabilities is the bounding (and ambient) set of a unit, with why each
// is there. Both daemons were started with exactly these (setpriv
// --bounding-set, in a network namespace of their own): without
// CAP_SYS_ADMIN either stops at start with "operation not permitted", and
// the server does without CAP_NET_ADMIN too.
func Capabilities(s Spec) []string {
	// CAP_NET_ADMIN: the client's TUN device, its routes, rules and MPTCP
	// endpoints (netlink), SO_MARK on its sockets; the server's MPTCP
	// limits (generic netlink, admin only); net.* sysctls.
	// CAP_SYS_ADMIN: setns(2). pathmgr, routing and the MPTCP path
	// manager open their netlink sockets inside the daemon's network
	// namespace by joining it (vishvananda/netlink's NewHandleAt, netns.Set),
	// and the kernel asks for CAP_SYS_ADMIN to join a network namespace,
	// even the one the thread is already in. The unit takes back what
	// CAP_SYS_ADMIN could do to the sandbox (mount(2), new namespaces)
	// with SystemCallFilter= and RestrictNamespaces=.
	// CAP_NET_RAW, the server only: it pings for its clients, with an
	// unprivileged ICMP socket where net.ipv4.ping_group_range includes
	// root's group (the default "1 0" includes nobody), else with a raw
	// one. The client opens no raw or packet socket, and SO_MARK accepts
	// CAP_NET_ADMIN. Not CAP_DAC_OVERRIDE: all it opens is root's.
	caps := []string{"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
	if s.Role == "server" {
		caps = append(caps, "CAP_NET_RAW")
	}
	if s.BindLowPort {
		caps = append(caps, "CAP_NET_BIND_SERVICE")
	}
	return caps
}

// Render returns the unit file for s.
func Render(s Spec) ([]byte, error) {
	if s.Role != "client" && s.Role != "server" {
		return nil, fmt.Errorf("unit: role %q: want client or server", s.Role)
	}
	for _, p := range []string{s.Exec, s.Config} {
		if !safePath(p) {
			return nil, fmt.Errorf("unit: %q: want an absolute path of letters, digits and / . _ + - only (systemd would split or expand anything else)", p)
		}
	}
	var b bytes.Buffer
	err := unitText.Execute(&b, struct {
		Spec
		Name string
		Caps string
	}{s, Name(s.Role), strings.Join(Capabilities(s), " ")})
	return b.Bytes(), err
}

// safePath accepts what ExecStart= takes verbatim: no spaces or quotes
// (word splitting), no % (specifiers), no $ (variables), no backslash.
func safePath(p string) bool {
	if !strings.HasPrefix(p, "/") {
		return false
	}
	for _, r := range p {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case strings.ContainsRune("/._+-", r):
		default:
			return false
		}
	}
	return true
}

// Each directive was checked against systemd.exec(5) and
// systemd.resource-control(5) (systemd 252), and the units pass
// `systemd-analyze verify`.
var unitText = template.Must(template.New("unit").Parse(`{{/* the first line must begin with Marker */ -}}
# Written by ` + "`mpvpn install {{.Role}}`" + `. The service runs ` + "`mpvpn {{.Role}} --config {{.Config}}`" + `:
# change the configuration there, then ` + "`systemctl restart {{.Name}}`" + `. ` + "`mpvpn install`" + ` rewrites
# this file, so put changes to the unit in a drop-in (` + "`systemctl edit {{.Name}}`" + `).
# Remove everything ` + "`mpvpn install`" + ` wrote with ` + "`mpvpn uninstall {{.Role}}`" + `.

[Unit]
{{- if eq .Role "client"}}
Description=mpvpn client: this host's TCP flows over every uplink to the concentrator
{{- else}}
Description=mpvpn server: the concentrator of mpvpn clients' flows
{{- end}}
Documentation=https://github.com/mpvpn/mpvpn#running-as-a-service
{{- if eq .Role "client"}}
# The uplinks and their gateways are read from the host's routes at start.
{{- end}}
Wants=network-online.target
After=network-online.target

[Service]
# mpvpn does not speak sd_notify: it is up once it has started.
Type=simple
ExecStart={{.Exec}} {{.Role}} --config {{.Config}}
Restart=on-failure
RestartSec=5s

# Root, bounded to these capabilities (mpvpn's internal/unit says why each):
# CAP_NET_ADMIN for netlink, {{if eq .Role "client"}}the TUN device, SO_MARK, {{end}}MPTCP and net.* sysctls;
# CAP_SYS_ADMIN only because mpvpn joins its own network namespace (setns) to
# open netlink sockets{{if eq .Role "server"}}; CAP_NET_RAW to ping for the clients (raw ICMP, where
# net.ipv4.ping_group_range does not let root's group use ping sockets){{end}}{{if .BindLowPort}};
# CAP_NET_BIND_SERVICE for a port below 1024{{end}}.
User=root
CapabilityBoundingSet={{.Caps}}
# The same set, should User= ever be changed from root.
AmbientCapabilities={{.Caps}}
NoNewPrivileges=yes
# What CAP_SYS_ADMIN would let it undo is filtered: mount(2) and friends,
# and every namespace but the network one it joins. Not @resources: Go
# raises RLIMIT_NOFILE at start, and every flow is a socket.
SystemCallFilter=~@clock @cpu-emulation @debug @module @mount @obsolete @raw-io @reboot @swap
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
RestrictNamespaces=net
# Every flow holds sockets (two on the concentrator): room for a million.
LimitNOFILE=1048576

# Files: all read-only, but for the status socket's /run/mpvpn, /var/lib/mpvpn
# and the network sysctls.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
UMask=0077
RuntimeDirectory=mpvpn
RuntimeDirectoryMode=0700
# Kept when the service stops: the client's journal of its changes to the host
# (/run/mpvpn/client.journal) must outlive a crash for the next start to undo
# them, and the client's and the server's units share the directory.
RuntimeDirectoryPreserve=yes
StateDirectory=mpvpn
StateDirectoryMode=0700
# /proc/sys and /sys read-only, except /proc/sys/net: mpvpn sets net.mptcp.*,
# net.ipv4.tcp_fastopen{{if eq .Role "client"}} and its uplinks' rp_filter{{end}}, and puts them back when
# it stops. (Without ProtectKernelTunables all of /proc/sys would be writable.)
ProtectKernelTunables=yes
ReadWritePaths=/proc/sys/net
{{- if eq .Role "client"}}
# /dev/net/tun, and no other device (PrivateDevices=yes would hide it).
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
# Not ProtectControlGroups=: for per-app rules the client makes cgroups and
# moves apps into them. (ProtectKernelTunables= leaves /sys/fs/cgroup writable.)
# route-all's DNS hook: systemd-resolved over D-Bus (its socket needs no
# writable file system), or else /etc/resolv.conf, writable through this bind
# mount (mpvpn then rewrites it in place, and puts it back when it stops).
ReadWritePaths=-/etc/resolv.conf
{{- else}}
PrivateDevices=yes
ProtectControlGroups=yes
ProtectProc=invisible
{{- end}}
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
# TCP, MPTCP and UDP; netlink; the status socket.
RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes

[Install]
WantedBy=multi-user.target
`))
