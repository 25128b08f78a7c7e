//go:build !linux

package probe

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
)

type pktinfo struct{}

func enablePktinfo(*net.UDPConn) (*pktinfo, error) { return nil, errors.ErrUnsupported }
func (*pktinfo) dst([]byte) netip.Addr             { return netip.Addr{} }
func (*pktinfo) src(netip.Addr) []byte             { return nil }

func controlMark(_ syscall.RawConn, mark uint32) error {
	if mark != 0 {
		return errors.New("SO_MARK is Linux only")
	}
	return nil
}
