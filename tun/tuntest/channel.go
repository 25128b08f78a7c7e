//go:build linux

// Package tuntest has test doubles for the TUN: a device made of Go
// channels, and (on Linux) a network namespace per test for the tests
// that need the real one.
package tuntest

import (
	"os"
	"sync"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Channel is a golang.zx2c4.com/wireguard/tun.Device made of Go channels.
// A packet sent on ToStack is read by the device's user as if the kernel
// had routed it into the TUN; a packet the user writes comes out on
// FromStack. Read returns as many queued packets as the batch allows, so
// batching code paths run as with the real device.
type Channel struct {
	ToStack   chan []byte // packets for the user to Read
	FromStack chan []byte // packets the user wrote (one copy each)

	mtu, batch int
	events     chan wgtun.Event
	closed     chan struct{}
	closeOnce  sync.Once
}

var _ wgtun.Device = (*Channel)(nil)

// NewChannel returns an open Channel device with the given MTU and batch
// size. FromStack is buffered (4096 packets) so a test need not drain
// what it does not look at; once it is full, Write blocks as a slow
// kernel would.
func NewChannel(mtu, batch int) *Channel {
	if batch < 1 {
		batch = 1
	}
	c := &Channel{
		ToStack:   make(chan []byte, 256),
		FromStack: make(chan []byte, 4096),
		mtu:       mtu,
		batch:     batch,
		events:    make(chan wgtun.Event, 1),
		closed:    make(chan struct{}),
	}
	c.events <- wgtun.EventUp
	return c
}

// File implements tun.Device; there is no file.
func (c *Channel) File() *os.File { return nil }

// Read implements tun.Device: it waits for one packet, then takes the
// ones already queued, up to len(bufs) and the batch size.
func (c *Channel) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	var p []byte
	select {
	case <-c.closed:
		return 0, os.ErrClosed
	case p = <-c.ToStack:
	}
	n := 0
	for {
		sizes[n] = copy(bufs[n][offset:], p)
		n++
		if n == len(bufs) || n == c.batch {
			return n, nil
		}
		select {
		case p = <-c.ToStack:
		default:
			return n, nil
		}
	}
}

// Write implements tun.Device.
func (c *Channel) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		p := append([]byte(nil), b[offset:]...)
		select {
		case <-c.closed:
			return i, os.ErrClosed
		case c.FromStack <- p:
		}
	}
	return len(bufs), nil
}

// MTU implements tun.Device.
func (c *Channel) MTU() (int, error) { return c.mtu, nil }

// Name implements tun.Device.
func (c *Channel) Name() (string, error) { return "chantun", nil }

// Events implements tun.Device.
func (c *Channel) Events() <-chan wgtun.Event { return c.events }

// BatchSize implements tun.Device.
func (c *Channel) BatchSize() int { return c.batch }

// Close implements tun.Device; it may be called more than once.
func (c *Channel) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		close(c.events)
	})
	return nil
}

// Closed is closed once the device is.
func (c *Channel) Closed() <-chan struct{} { return c.closed }
