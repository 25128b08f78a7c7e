# Shared by scripts/*.sh: dependency install and preflight checks.

# need_root exits unless we are root: every script builds network namespaces.
need_root() {
	if [ "$(id -u)" != 0 ]; then
		echo "$0: run as root (it builds network namespaces): sudo $0" >&2
		exit 1
	fi
}

# install_deps installs what the scripts and tests use, from Debian's packages,
# only when something is missing. Arguments are more commands to have, as
# COMMAND or COMMAND:PACKAGE when Debian's package has another name
# (test.sh: chromium, for the dashboard; bench_outage.sh: gnuplot:gnuplot-nox).
install_deps() {
	local missing=()
	local extra
	for extra in "$@"; do
		command -v "${extra%%:*}" >/dev/null || missing+=("${extra#*:}")
	done
	command -v ip >/dev/null || missing+=(iproute2)
	command -v iperf3 >/dev/null || missing+=(iperf3)
	command -v nft >/dev/null || missing+=(nftables)
	command -v curl >/dev/null || missing+=(curl)
	command -v dnsmasq >/dev/null || missing+=(dnsmasq)
	command -v tcpdump >/dev/null || missing+=(tcpdump)
	command -v dig >/dev/null || missing+=(bind9-dnsutils)   # the DNS tests and bench rows
	command -v dbus-daemon >/dev/null || missing+=(dbus-daemon) # dnsconf's test of the systemd-resolved backend (a private bus)
	command -v ping >/dev/null || missing+=(iputils-ping)   # the kill-switch leak probes
	command -v setpriv >/dev/null || missing+=(util-linux)  # the per-app tests run programs as other uids
	command -v ethtool >/dev/null || missing+=(ethtool)
	command -v python3 >/dev/null || missing+=(python3)
	command -v bc >/dev/null || missing+=(bc)
	command -v ss >/dev/null || missing+=(iproute2)
	command -v nstat >/dev/null || missing+=(iproute2)
	command -v systemd-analyze >/dev/null || missing+=(systemd) # the install tests verify the units
	if [ ${#missing[@]} -gt 0 ]; then
		echo "installing: ${missing[*]}" >&2
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
	if ! command -v go >/dev/null; then
		if [ -x /usr/local/go/bin/go ]; then
			export PATH=$PATH:/usr/local/go/bin
		else
			echo "$0: Go is required (https://go.dev/doc/install)" >&2
			exit 1
		fi
	fi
}

# preflight fails (never skips) when the kernel lacks what mpvpn needs.
preflight() {
	local ok=1
	[ -c /dev/net/tun ] || { echo "preflight: no /dev/net/tun" >&2; ok=0; }
	[ "$(cat /proc/sys/net/mptcp/enabled 2>/dev/null)" = 1 ] || { echo "preflight: Multipath TCP is not enabled (net.mptcp.enabled)" >&2; ok=0; }
	[ $ok = 1 ] || exit 1
}
