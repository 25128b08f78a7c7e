//go:build linux

// Package control is how an operator looks inside a running mpvpn (issue 4):
// a local status socket that `mpvpn status` reads, a human rendering of what
// it returns, and the same figures as Prometheus metrics.
//
// # The status socket
//
// The client and the concentrator each listen on a unix stream socket,
// /run/mpvpn/<role>.sock by default (the caller picks the path). The
// directory is created 0700; one that exists must be a real directory of
// root's (or the daemon's user's) that group and others cannot write to.
// The socket is bound in a private directory, made 0600 there and only
// then linked at its path, so it never has another mode there and no
// symlink is followed. Every connection's peer credentials (SO_PEERCRED)
// are checked as well, so only root (or the daemon's own user) is
// answered even if the socket's mode is changed later.
//
// Protocol: the client writes one line, "status\n"; the server answers one
// JSON document (a [Status]) and closes. A request longer than 64
// bytes, or a connection that takes more than a second, is dropped; at most
// 16 connections are answered at once. An unknown request is answered with {"error": "..."}.
//
// [Listen] is separate from [Listener.Serve] so that a second mpvpn on the same socket
// ("another mpvpn is running") is an error before the caller changes routes
// or interfaces. A socket file that nothing answers on is left over from a
// crash and is replaced.
//
// # Metrics
//
// [NewCollector] turns the same Status into Prometheus metrics, calling get
// once per scrape so that the numbers agree with each other and with the
// JSON. [ServeMetrics] serves them, with the Go runtime and process
// collectors, on /metrics of an address of the operator's choosing; it binds
// before returning so a taken port is an error at startup.
package control
