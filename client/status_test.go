//go:build linux

package client

import (
	"reflect"
	"testing"

	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/stack"
)

func TestStackStatus(t *testing.T) {
	got := stackStatus(stack.Stats{InFlight: 3, Active: 9, Forwarded: 10, Limited: 7})
	if want := (&control.Stack{InFlight: 3, SYNLimited: 7}); !reflect.DeepEqual(got, want) {
		t.Errorf("stackStatus = %+v, want %+v", got, want)
	}
}
