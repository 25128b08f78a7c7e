//go:build !linux

package tun

import (
	"errors"
	"log/slog"
)

func open(Config, *slog.Logger) (*Device, error) {
	return nil, errors.ErrUnsupported
}
