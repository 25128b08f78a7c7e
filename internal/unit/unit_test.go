//go:build linux

package unit

import (
	"strings"
	"testing"
)

func TestUnitRender(t *testing.T) {
	tests := []struct {
		spec      Spec
		want, not []string
	}{
		{
			Spec{Role: "client", Exec: "/usr/local/bin/mpvpn", Config: "/etc/mpvpn/client.toml"},
			[]string{
				"ExecStart=/usr/local/bin/mpvpn client --config /etc/mpvpn/client.toml\n",
				"\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN\n",
				"\nDeviceAllow=/dev/net/tun rw\n", "\nDevicePolicy=closed\n", "\nPrivateDevices=no\n",
				"\nProtectKernelTunables=yes\n", "\nReadWritePaths=/proc/sys/net\n", "\nReadWritePaths=-/etc/resolv.conf\n",
				"\nRuntimeDirectory=mpvpn\n", "\nStateDirectory=mpvpn\n",
				"\nWantedBy=multi-user.target\n",
			},
			// The client is to make cgroups for per-app rules.
			[]string{"ProtectControlGroups=yes", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "ProtectProc="},
		},
		{
			Spec{Role: "server", Exec: "/usr/bin/mpvpn", Config: "/etc/mpvpn/server.toml", BindLowPort: true},
			[]string{
				"ExecStart=/usr/bin/mpvpn server --config /etc/mpvpn/server.toml\n",
				"\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n",
				"\nAmbientCapabilities=CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n",
				"\nPrivateDevices=yes\n", "\nProtectControlGroups=yes\n",
			},
			[]string{"DeviceAllow=", "/dev/net/tun", "ReadWritePaths=-/etc/resolv.conf"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.spec.Role, func(t *testing.T) {
			b, err := Render(tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			text := string(b)
			if !Ours(b) {
				t.Errorf("the unit does not begin with the marker %q:\n%s", Marker, text)
			}
			for _, w := range tc.want {
				if !strings.Contains(text, w) {
					t.Errorf("no %q in:\n%s", strings.TrimSpace(w), text)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(text, n) {
					t.Errorf("%q in:\n%s", n, text)
				}
			}
		})
	}
}

func TestUnitRefusesWhatSystemdWouldSplit(t *testing.T) {
	for _, exec := range []string{"mpvpn", "/opt/my bin/mpvpn", "/opt/%n/mpvpn", "/opt/$HOME/mpvpn", `/opt/"x"/mpvpn`, "/opt/a\\b"} {
		if _, err := Render(Spec{Role: "client", Exec: exec, Config: "/etc/mpvpn/client.toml"}); err == nil {
			t.Errorf("Exec %q accepted", exec)
		}
	}
	if _, err := Render(Spec{Role: "concentrator", Exec: "/usr/bin/mpvpn", Config: "/etc/mpvpn/x.toml"}); err == nil {
		t.Error("role concentrator accepted")
	}
}
