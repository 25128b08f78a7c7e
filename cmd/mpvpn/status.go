//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/concentrator"
	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/ui"
)

// Default control sockets: root-only files under /run/mpvpn.
const (
	defaultClientSocket = "/run/mpvpn/client.sock"
	defaultServerSocket = "/run/mpvpn/server.sock"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// controlFlags are the status socket and metrics flags of a daemon.
func controlFlags(defaultSocket string) []cli.Flag {
	return []cli.Flag{
		&cli.PathFlag{Name: "control", Value: defaultSocket, Usage: "the status socket `PATH` that `mpvpn status` reads (root-only)"},
		&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics on http://`ADDR`/metrics (e.g. 127.0.0.1:9510); off by default"},
		&cli.StringFlag{Name: "ui", Usage: "serve the live dashboard on `ADDR`, a loopback address and port (127.0.0.1:9511) or unix:PATH; its URL, with this start's token, is in the log and `mpvpn status`; off by default"},
	}
}

// daemonControl is a daemon's status socket and metrics endpoint, bound
// before the host is changed so that a taken socket or port is a
// configuration error.
type daemonControl struct {
	ln          *control.Listener
	metrics, ui string
}

func listenControl(c *cli.Context) (*daemonControl, error) {
	ln, err := control.Listen(c.Path("control"))
	if err != nil {
		return nil, fmt.Errorf("--control: %w", err)
	}
	return &daemonControl{ln: ln, metrics: c.String("metrics"), ui: c.String("ui")}, nil
}

// serve answers the socket and, if asked, serves metrics and the
// dashboard, until the returned stop is called (it waits for them to end).
// status(flows) is the daemon's status, with its open flows listed when
// flows is set: metrics have no use for them, and listing them reads each
// flow's subflows.
func (d *daemonControl) serve(status func(flows bool) control.Status, log *slog.Logger) (stop func() error, err error) {
	ctx, cancel := context.WithCancel(context.Background())
	get := func() control.Status { return status(true) }
	var ms *control.MetricsServer
	if d.metrics != "" {
		if ms, err = control.ServeMetrics(ctx, d.metrics, control.NewCollector(func() control.Status { return status(false) }), log); err != nil {
			cancel()
			d.ln.Close()
			return nil, fmt.Errorf("--metrics: %w", err)
		}
		log.Info("metrics", "url", "http://"+ms.Addr().String()+"/metrics")
	}
	var us *ui.Server
	if d.ui != "" {
		if us, err = ui.Serve(ctx, ui.Config{Addr: d.ui, Status: get, Logger: log}); err != nil {
			cancel()
			if ms != nil {
				ms.Close()
			}
			d.ln.Close()
			return nil, fmt.Errorf("--ui: %w", err)
		}
		inner, url := get, us.URL()
		get = func() control.Status {
			st := inner()
			st.UI = url
			return st
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := d.ln.Serve(ctx, get, log); err != nil {
			log.Warn("status socket stopped", "err", err)
		}
	}()
	return func() error {
		cancel()
		<-done
		if ms != nil {
			ms.Close()
		}
		if us != nil {
			us.Close()
		}
		return d.ln.Close()
	}, nil
}

// serverStatus is the concentrator's side of `mpvpn status`, with its
// open flows if flows is set.
func serverStatus(srv *concentrator.Server, start time.Time, flows bool) control.Status {
	st := serverStatusOf(srv.Stats(), srv.Peers(), srv.Addr().String(), start)
	if !flows {
		return st
	}
	for _, f := range srv.OpenFlows(control.MaxOpenFlows) {
		of := control.OpenFlow{Peer: f.Peer.String(), Client: f.Client.String(), Dst: f.Dst.String(), Since: f.Since, RxBytes: f.RxBytes, TxBytes: f.TxBytes}
		for _, p := range f.Paths {
			of.Paths = append(of.Paths, control.FlowPath{Uplink: p.Addr.String(), Subflows: p.Subflows, RxBytes: p.BytesReceived, TxBytes: p.BytesAcked})
		}
		st.OpenFlows = append(st.OpenFlows, of)
	}
	return st
}

// serverStatusOf maps the concentrator's counters to the status: every
// counter of tunnel.ServerStats is shown, but Flows and Active, which the
// concentrator's own counters of the same flows give.
func serverStatusOf(cs concentrator.Stats, peers []tunnel.PeerStats, listen string, start time.Time) control.Status {
	ts := cs.Tunnel
	st := control.Status{
		Role:    "server",
		Version: version,
		Started: start,
		Listen:  listen,
		Flows: control.Flows{
			Active: cs.Active,
			Total:  cs.Flows,
			Failed: cs.Refused + cs.Unreachable + cs.TimedOut,
			// Each limit is a refusal, as policy is.
			Rejected:  cs.NotAllowed + ts.Limited + ts.RateLimited + ts.Full + cs.OutOfFiles + ts.NoFiles,
			Fallbacks: ts.Fallbacks,
			Ciphers:   tunnel.CiphersOf(ts.AcceptsAES),
			AESGCM:    ts.AESGCM,
			RxBytes:   cs.BytesUp,
			TxBytes:   cs.BytesDown,
		},
		Handshakes: &control.Handshakes{
			Accepted: ts.Accepted,
			HalfOpen: ts.HalfOpen,
			Evicted:  ts.Evicted,
			Rejected: control.Rejected{
				Incomplete:   ts.Incomplete,
				BadMAC:       ts.BadMAC,
				BadHandshake: ts.BadHandshake,
				UnknownPeer:  ts.UnknownPeer,
				BadPayload:   ts.BadPayload,
				BadTime:      ts.BadTime,
				Replayed:     ts.Replayed,
				ReplayFull:   ts.ReplayFull,
			},
			Limited: control.Limited{Peer: ts.Limited, Rate: ts.RateLimited, Server: ts.Full, Files: cs.OutOfFiles, AcceptFiles: ts.NoFiles},
		},
		Verdicts: &control.Verdicts{
			Connected:   cs.Connected,
			Refused:     cs.Refused,
			Unreachable: cs.Unreachable,
			TimedOut:    cs.TimedOut,
			NotAllowed:  cs.NotAllowed,
		},
		DNS:  &control.DNS{Streams: cs.DNSStreams, Queries: cs.DNSQueries, Failed: cs.DNSFailed},
		Pool: &control.Pool{Ready: ts.Pooled, Limited: ts.PoolLimited, Unused: ts.PoolUnused, Reused: ts.Reused},
		UDP: &control.UDP{Streams: cs.UDP.Streams, Flows: cs.UDP.ActiveFlows, Up: cs.UDP.Up, Down: cs.UDP.Down,
			UpBytes: cs.UDP.UpBytes, DownBytes: cs.UDP.DownBytes, Refused: cs.UDP.Refused, Dropped: cs.UDP.Dropped,
			Sockets: cs.UDP.Flows, Evicted: uint64(cs.UDP.EvictedFlows), SendErrors: cs.UDP.SendErrors,
			Pings: cs.UDP.Pings, Echoes: cs.UDP.Echoes, PathIn: cs.UDPPathPackets, PathRejected: cs.UDPPathRejected, Unreachable: cs.UDP.Unreachable},
	}
	for _, p := range peers {
		st.Peers = append(st.Peers, control.Peer{
			Key:         p.Key.String(),
			ActiveFlows: p.Active,
			TotalFlows:  p.Total,
			LastSeen:    p.LastSeen,
			Limited:     p.Limited,
			ReplayFull:  p.ReplayFull,
		})
	}
	return st
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show a running mpvpn's uplinks, flows and concentrator (or, with --server, the concentrator's peers)",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the status as JSON, for scripts"},
			&cli.BoolFlag{Name: "watch", Usage: "refresh every --interval, with per-uplink throughput"},
			&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "refresh period of --watch"},
			&cli.BoolFlag{Name: "server", Usage: "ask the concentrator on this host (" + defaultServerSocket + ")"},
			&cli.BoolFlag{Name: "flows", Usage: "list the open flows, oldest first, after the status: a client's with destination, age, bytes and rates, and each uplink's share; with --server, the concentrator's with client key, the address its connection came from, destination, age, bytes and each client address's share"},
			&cli.PathFlag{Name: "socket", Usage: "the status socket `PATH` (default " + defaultClientSocket + ", or the server's with --server)"},
		},
		Action: runStatus,
	}
}

func runStatus(c *cli.Context) error {
	path := c.Path("socket")
	if path == "" {
		path = defaultClientSocket
		if c.Bool("server") {
			path = defaultServerSocket
		}
	}
	interval := c.Duration("interval")
	if interval <= 0 {
		return usageError("--interval %v: must be positive", interval)
	}
	out := c.App.Writer
	var prev *control.Status
	for {
		st, err := control.Fetch(c.Context, path)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(st); err != nil {
				return err
			}
		} else {
			if c.Bool("watch") {
				fmt.Fprint(out, "\033[H\033[2J") // clear the terminal
			}
			if err := control.Render(out, st, prev, interval); err != nil {
				return err
			}
			if c.Bool("flows") {
				if err := control.RenderFlows(out, st); err != nil {
					return err
				}
			}
		}
		if !c.Bool("watch") {
			return nil
		}
		prev = &st
		select {
		case <-c.Context.Done():
			return nil
		case <-time.After(interval):
		}
	}
}
