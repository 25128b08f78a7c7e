//go:build linux

package ui

import (
	"reflect"
	"testing"

	"github.com/mpvpn/mpvpn/control"
)

// The ring before and after it fills: since returns what came after a
// number, oldest first, at most what is kept, with the newest status.
func TestHistory(t *testing.T) {
	h := newHistory(3)
	ts := func(s []sample) []int64 {
		var out []int64
		for _, x := range s {
			out = append(out, x.T)
		}
		return out
	}
	tests := []struct {
		add   int64 // samples 1..add in all
		since uint64
		want  []int64
	}{
		{0, 0, nil},
		{2, 0, []int64{1, 2}},
		{2, 1, []int64{2}},
		{2, 2, nil},
		{3, 0, []int64{1, 2, 3}},
		{5, 0, []int64{3, 4, 5}},
		{5, 3, []int64{4, 5}},
		{7, 1, []int64{5, 6, 7}},
		{7, 9, nil},
	}
	added := int64(0)
	for _, tt := range tests {
		for ; added < tt.add; added++ {
			h.add(sample{T: added + 1}, control.Status{Version: string(rune('a' + added))})
		}
		got, st, seq := h.since(tt.since)
		if !reflect.DeepEqual(ts(got), tt.want) || seq != uint64(tt.add) {
			t.Errorf("after %d, since(%d) = %v (newest %d), want %v", tt.add, tt.since, ts(got), seq, tt.want)
		}
		if tt.add > 0 && st.Version != string(rune('a'+tt.add-1)) {
			t.Errorf("after %d: status %q, want the newest sample's", tt.add, st.Version)
		}
	}
	select {
	case <-h.wait(6):
	default:
		t.Error("wait(6) with 7 samples does not return at once")
	}
	select {
	case <-h.wait(7):
		t.Error("wait(7) returned with no sample after 7")
	default:
	}
}
