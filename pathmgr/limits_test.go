//go:build linux

package pathmgr

import "testing"

func TestConfigLimits(t *testing.T) {
	two := []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}
	one := two[:1]
	tests := []struct {
		name             string
		cfg              Config
		subflows, accept uint32
		fullmesh         bool
	}{
		{"one uplink, default", Config{Uplinks: one}, 2, 0, false},
		{"two uplinks, default", Config{Uplinks: two}, 2, 0, false},
		{"three uplinks, SubflowsPerUplink 1", Config{Uplinks: append(two, UplinkConfig{Name: "wan2"}), SubflowsPerUplink: 1}, 3, 0, false},
		{"two uplinks, 2 each", Config{Uplinks: two, SubflowsPerUplink: 2}, 5, 1, true},
		{"two uplinks, 4 each: the kernel's ceiling", Config{Uplinks: two, SubflowsPerUplink: 4}, 8, 3, true},
		{"one uplink, 8", Config{Uplinks: one, SubflowsPerUplink: 8}, 8, 7, true},
		{"one uplink, 20: capped", Config{Uplinks: one, SubflowsPerUplink: 20}, 8, 8, true},
		{"other family", Config{Uplinks: two, AnyFamily: true}, 2, 2, true},
		{"other family, 3 each", Config{Uplinks: two, AnyFamily: true, SubflowsPerUplink: 3}, 7, 3, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.cfg.fullmesh(); got != tt.fullmesh {
				t.Errorf("fullmesh() = %v, want %v", got, tt.fullmesh)
			}
			s, a := tt.cfg.limits()
			if s != tt.subflows || a != tt.accept {
				t.Errorf("limits() = subflows %d, accept %d; want %d, %d", s, a, tt.subflows, tt.accept)
			}
		})
	}
}
