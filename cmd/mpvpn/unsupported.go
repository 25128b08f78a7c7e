//go:build !linux

// mpvpn runs on Linux only: it is built on kernel Multipath TCP, rtnetlink
// and generic netlink (routes, rules, MPTCP endpoints), and the TUN device.
// Every other file of the module is constrained to Linux, so on another
// system this is all that is left, and it fails the build with one line
// that says why.
package main

var _ = mpvpn_runs_on_Linux_only__it_needs_kernel_Multipath_TCP_netlink_and_TUN
