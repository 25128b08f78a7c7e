package probe

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// controlMark sets SO_MARK on a probe socket before it is bound, so its
// datagrams bypass the TUN as the tunnel's own connections do.
func controlMark(rc syscall.RawConn, mark uint32) error {
	if mark == 0 {
		return nil
	}
	var serr error
	err := rc.Control(func(fd uintptr) {
		if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			serr = fmt.Errorf("set SO_MARK %#x (needs CAP_NET_ADMIN): %w", mark, err)
		}
	})
	if err != nil {
		return err
	}
	return serr
}
