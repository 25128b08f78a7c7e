//go:build !linux

package mptcpinfo

import (
	"errors"
	"syscall"
)

// Get needs Linux: elsewhere it reports errors.ErrUnsupported.
func Get(rc syscall.RawConn) (Info, error) { return Info{}, errors.ErrUnsupported }

// GetConn needs Linux: elsewhere it reports errors.ErrUnsupported.
func GetConn(c syscall.Conn) (Info, error) { return Info{}, errors.ErrUnsupported }
