//go:build !linux

package routing

import (
	"errors"
	"net/netip"
)

// Router is Linux-only: policy routing is a Linux kernel feature.
type Router struct{}

// Apply fails: routing needs Linux.
func Apply(Config) (*Router, error) { return nil, errors.ErrUnsupported }

// Close does nothing.
func (r *Router) Close() error { return nil }

// Routes returns nothing.
func (r *Router) Routes() []netip.Prefix { return nil }
