//go:build !linux

package pathmgr

import (
	"context"
	"errors"
)

// Manager is Linux-only: MPTCP endpoints and policy routing are Linux
// kernel features.
type Manager struct{}

// Start fails: pathmgr needs Linux.
func Start(context.Context, Config) (*Manager, error) { return nil, errors.ErrUnsupported }

// Uplinks returns nothing.
func (m *Manager) Uplinks() []Uplink { return nil }

// Close does nothing.
func (m *Manager) Close() error { return nil }

// SetLimits fails: pathmgr needs Linux.
func SetLimits(subflows, addAddrAccepted uint32) error { return errors.ErrUnsupported }

// RaiseLimits fails: pathmgr needs Linux.
func RaiseLimits(subflows, addAddrAccepted uint32) (func() error, error) {
	return nil, errors.ErrUnsupported
}

// SetSysctl fails: pathmgr needs Linux.
func SetSysctl(name, value string) error { return errors.ErrUnsupported }

// GetSysctl fails: pathmgr needs Linux.
func GetSysctl(name string) (string, error) { return "", errors.ErrUnsupported }

// DiscoverUplinks fails: pathmgr needs Linux.
func DiscoverUplinks(...string) ([]UplinkConfig, error) { return nil, errors.ErrUnsupported }
