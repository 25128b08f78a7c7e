//go:build !linux

package probe

import (
	"errors"
	"syscall"
)

func controlMark(_ syscall.RawConn, mark uint32) error {
	if mark != 0 {
		return errors.New("SO_MARK is Linux only")
	}
	return nil
}
