//go:build linux

package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metric descriptions. Names follow Prometheus conventions: counters end
// in _total, times are in seconds (the JSON's milliseconds divided by
// 1000), byte counters in bytes.
var (
	descInfo = prometheus.NewDesc("mpvpn_info",
		"Always 1; the labels tell the role and version.", []string{"role", "version"}, nil)
	descStarted = prometheus.NewDesc("mpvpn_start_time_seconds",
		"When this mpvpn started, in Unix seconds.", nil, nil)

	descUplinkUp = prometheus.NewDesc("mpvpn_uplink_up",
		"1 if the uplink is up, 0 if it is down or withdrawn.", []string{"uplink"}, nil)
	descUplinkState = prometheus.NewDesc("mpvpn_uplink_state",
		"1 for the uplink's current state, 0 for the others.", []string{"uplink", "state"}, nil)
	descUplinkBackup = prometheus.NewDesc("mpvpn_uplink_backup",
		"1 if the uplink is a backup, used only when no other is up.", []string{"uplink"}, nil)
	descUplinkTransitions = prometheus.NewDesc("mpvpn_uplink_transitions_total",
		"State changes of the uplink since start.", []string{"uplink"}, nil)
	descUplinkRx = prometheus.NewDesc("mpvpn_uplink_rx_bytes_total",
		"Bytes of mpvpn's flows received over the uplink.", []string{"uplink"}, nil)
	descUplinkTx = prometheus.NewDesc("mpvpn_uplink_tx_bytes_total",
		"Bytes of mpvpn's flows sent over the uplink.", []string{"uplink"}, nil)
	descUplinkSubflows = prometheus.NewDesc("mpvpn_uplink_subflows",
		"MPTCP subflows open on the uplink.", []string{"uplink"}, nil)
	descUplinkRTT = prometheus.NewDesc("mpvpn_uplink_rtt_seconds",
		"Smoothed round-trip time of the uplink's subflows (0 if none).", []string{"uplink"}, nil)
	descUplinkFallbacks = prometheus.NewDesc("mpvpn_uplink_fallbacks_total",
		"Flows that started on the uplink and fell back to plain TCP.", []string{"uplink"}, nil)
	descUplinkProbeUp = prometheus.NewDesc("mpvpn_uplink_probe_up",
		"1 if the liveness probe reaches the concentrator over the uplink.", []string{"uplink"}, nil)
	descUplinkProbes = prometheus.NewDesc("mpvpn_uplink_probes_total",
		"Liveness probes of the uplink, sent and replies received, since it last started from an address.", []string{"uplink", "dir"}, nil)
	descUplinkProbeRTT = prometheus.NewDesc("mpvpn_uplink_probe_rtt_seconds",
		"Round-trip time of the uplink's liveness probe.", []string{"uplink"}, nil)

	descNetlinkChanges = prometheus.NewDesc("mpvpn_netlink_changes_total",
		"Routes, rules and MPTCP endpoints the path manager added or removed (client).", nil, nil)
	descFlowsActive = prometheus.NewDesc("mpvpn_flows_active",
		"TCP flows open now.", nil, nil)
	descFlowsTotal = prometheus.NewDesc("mpvpn_flows_total",
		"TCP flows opened since start.", nil, nil)
	descFlowsFailed = prometheus.NewDesc("mpvpn_flows_failed_total",
		"TCP flows that could not be opened.", nil, nil)
	descFlowsRejected = prometheus.NewDesc("mpvpn_flows_rejected_total",
		"TCP flows refused (limits, policy).", nil, nil)
	descFlowsFallback = prometheus.NewDesc("mpvpn_flows_fallback_total",
		"TCP flows carried on plain TCP instead of MPTCP.", nil, nil)
	descFlowsAESGCM = prometheus.NewDesc("mpvpn_flows_aes_gcm_total",
		"TCP flows sealed with AES-256-GCM (the others: ChaCha20-Poly1305).", nil, nil)
	descRx = prometheus.NewDesc("mpvpn_rx_bytes_total",
		"Bytes received on mpvpn's flows.", nil, nil)
	descTx = prometheus.NewDesc("mpvpn_tx_bytes_total",
		"Bytes sent on mpvpn's flows.", nil, nil)

	descHandshakesAccepted = prometheus.NewDesc("mpvpn_handshakes_accepted_total",
		"Connections the tunnel listener accepted (server).", nil, nil)
	descHandshakesHalfOpen = prometheus.NewDesc("mpvpn_handshakes_half_open",
		"Connections in the handshake now (server).", nil, nil)
	descHandshakesEvicted = prometheus.NewDesc("mpvpn_handshakes_evicted_total",
		"Half-open connections closed before their deadline to make room for newer ones: a flood, or limits too low (server).", nil, nil)
	descHandshakesRejected = prometheus.NewDesc("mpvpn_handshakes_rejected_total",
		"Connections closed without an answer, by reason (server).", []string{"reason"}, nil)
	descFlowsLimited = prometheus.NewDesc("mpvpn_flows_limited_total",
		"Authenticated flows answered Limited, by limit: the peer's flows, its rate, or the server's flows (server).", []string{"limit"}, nil)
	descFlowVerdicts = prometheus.NewDesc("mpvpn_flow_verdicts_total",
		"What became of the flows handed to the concentrator, by verdict (server).", []string{"verdict"}, nil)
	descStackInFlight = prometheus.NewDesc("mpvpn_stack_syns_in_flight",
		"SYNs the client's netstack is forwarding now.", nil, nil)
	descStackSYNLimited = prometheus.NewDesc("mpvpn_stack_syn_limited_total",
		"SYNs the client's netstack answered with a reset because too many were in flight.", nil, nil)
	descStackTimeWaitRetired = prometheus.NewDesc("mpvpn_stack_time_wait_retired_total",
		"New SYNs that retired the client's netstack endpoint of an earlier flow in TIME_WAIT on the same 4-tuple (an app reusing its port).", nil, nil)
	descUDP = prometheus.NewDesc("mpvpn_udp_datagrams_total",
		"The UDP relay, by counter: tunnel streams of the datagram service; datagrams up (to the destinations) and down, and their bytes; refused by the concentrator's policy; dropped (a full queue, no stream); the server's sockets opened, flows evicted, send errors.", []string{"counter"}, nil)
	descPoolReady = prometheus.NewDesc("mpvpn_pool_ready",
		"Connections to the concentrator authenticated ahead of any flow, waiting now (client: its pool; server: its clients').", nil, nil)
	descPoolGrow = prometheus.NewDesc("mpvpn_pool_grow",
		"Connections the client's pool keeps now beyond its --pool, for the rate its flows open at.", nil, nil)
	descPool = prometheus.NewDesc("mpvpn_pool_total",
		"The connection pool, by event: a flow took one (hit); one was found closed by the server (stale) or retired unused (expired); dialled, failed; refused by the per-client cap (limited) or closed unused by the server (unused); left by a finished flow for the next one (reused).", []string{"event"}, nil)
	descUDPFlows = prometheus.NewDesc("mpvpn_udp_flows",
		"Application UDP sockets with a relay flow now.", nil, nil)
	descDNS = prometheus.NewDesc("mpvpn_dns_total",
		"mpvpn's resolver, by counter: tunnel streams to the resolver, queries, queries failed (SERVFAIL), queries dropped (client, too many waiting).", []string{"counter"}, nil)

	descPeerActive = prometheus.NewDesc("mpvpn_peer_flows_active",
		"TCP flows of the peer open now.", []string{"peer"}, nil)
	descPeerTotal = prometheus.NewDesc("mpvpn_peer_flows_total",
		"TCP flows of the peer opened since start.", []string{"peer"}, nil)
	descPeerLastSeen = prometheus.NewDesc("mpvpn_peer_last_seen_seconds",
		"When the peer was last heard from, in Unix seconds (absent if never).", []string{"peer"}, nil)
	descPeerLimited = prometheus.NewDesc("mpvpn_peer_flows_limited_total",
		"TCP flows of the peer answered Limited (any limit).", []string{"peer"}, nil)
	descPeerReplayFull = prometheus.NewDesc("mpvpn_peer_replay_full_total",
		"Handshakes of the peer dropped because its replay cache was full.", []string{"peer"}, nil)
)

var allDescs = []*prometheus.Desc{
	descInfo, descStarted,
	descUplinkUp, descUplinkState, descUplinkBackup, descUplinkTransitions,
	descUplinkRx, descUplinkTx, descUplinkSubflows, descUplinkRTT,
	descUplinkFallbacks, descUplinkProbeUp, descUplinkProbeRTT, descUplinkProbes,
	descFlowsActive, descFlowsTotal, descFlowsFailed, descFlowsRejected,
	descFlowsFallback, descFlowsAESGCM, descRx, descTx, descNetlinkChanges,
	descHandshakesAccepted, descHandshakesHalfOpen, descHandshakesEvicted,
	descHandshakesRejected, descFlowsLimited, descFlowVerdicts,
	descStackInFlight, descStackSYNLimited, descStackTimeWaitRetired, descDNS, descUDP, descUDPFlows, descPoolReady, descPoolGrow, descPool,
	descPeerActive, descPeerTotal, descPeerLastSeen, descPeerLimited, descPeerReplayFull,
}

// uplinkStates are the states mpvpn_uplink_state always has a series for,
// so that a query for state="down" finds a 0 rather than nothing.
var uplinkStates = []string{StateUp, StateDown, StateWithdrawn}

// collector turns one Status into metrics per scrape.
type collector struct {
	get func() Status
}

// NewCollector gives the figures of get() as Prometheus metrics, calling
// get once per scrape so that they agree with each other and with the
// status socket's JSON. An uplink or peer listed twice is reported once
// (the first), as Prometheus refuses duplicate series.
func NewCollector(get func() Status) prometheus.Collector {
	return &collector{get: get}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.get()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	gauge(descInfo, 1, s.Role, s.Version)
	if !s.Started.IsZero() {
		gauge(descStarted, unixSeconds(s.Started))
	}

	seen := make(map[string]bool)
	for _, u := range s.Uplinks {
		if seen[u.Name] {
			continue
		}
		seen[u.Name] = true
		n := u.Name
		gauge(descUplinkUp, boolFloat(u.State == StateUp), n)
		known := false
		for _, st := range uplinkStates {
			known = known || st == u.State
			gauge(descUplinkState, boolFloat(st == u.State), n, st)
		}
		if !known {
			gauge(descUplinkState, 1, n, u.State)
		}
		gauge(descUplinkBackup, boolFloat(u.Backup), n)
		counter(descUplinkTransitions, float64(u.Transitions), n)
		counter(descUplinkRx, float64(u.RxBytes), n)
		counter(descUplinkTx, float64(u.TxBytes), n)
		gauge(descUplinkSubflows, float64(u.Subflows), n)
		gauge(descUplinkRTT, u.RTT/1000, n)
		counter(descUplinkFallbacks, float64(u.Fallbacks), n)
		gauge(descUplinkProbeUp, boolFloat(u.ProbeAlive), n)
		gauge(descUplinkProbeRTT, u.ProbeRTT/1000, n)
		counter(descUplinkProbes, float64(u.ProbesSent), n, "sent")
		counter(descUplinkProbes, float64(u.ProbesReceived), n, "received")
	}

	if s.Role == "client" {
		counter(descNetlinkChanges, float64(s.NetlinkChanges))
	}
	f := s.Flows
	gauge(descFlowsActive, float64(f.Active))
	counter(descFlowsTotal, float64(f.Total))
	counter(descFlowsFailed, float64(f.Failed))
	counter(descFlowsRejected, float64(f.Rejected))
	counter(descFlowsFallback, float64(f.Fallbacks))
	counter(descFlowsAESGCM, float64(f.AESGCM))
	counter(descRx, float64(f.RxBytes))
	counter(descTx, float64(f.TxBytes))

	// Every reason, limit and verdict has a series from the start, zero
	// until it happens, so that rate() and increase() see the first one.
	if h := s.Handshakes; h != nil {
		counter(descHandshakesAccepted, float64(h.Accepted))
		gauge(descHandshakesHalfOpen, float64(h.HalfOpen))
		counter(descHandshakesEvicted, float64(h.Evicted))
		for _, c := range h.Rejected.Counts() {
			counter(descHandshakesRejected, float64(c.Value), c.Name)
		}
		for _, c := range h.Limited.Counts() {
			counter(descFlowsLimited, float64(c.Value), c.Name)
		}
	}
	if v := s.Verdicts; v != nil {
		for _, c := range v.Counts() {
			counter(descFlowVerdicts, float64(c.Value), c.Name)
		}
	}
	if st := s.Stack; st != nil {
		gauge(descStackInFlight, float64(st.InFlight))
		counter(descStackSYNLimited, float64(st.SYNLimited))
		counter(descStackTimeWaitRetired, float64(st.TimeWaitRetired))
	}
	if d := s.DNS; d != nil {
		for _, c := range d.Counts() {
			counter(descDNS, float64(c.Value), c.Name)
		}
	}
	if u := s.UDP; u != nil {
		for _, c := range u.Counts() {
			counter(descUDP, float64(c.Value), c.Name)
		}
		gauge(descUDPFlows, float64(u.Flows))
	}
	if p := s.Pool; p != nil {
		gauge(descPoolReady, float64(p.Ready))
		if s.Role != "server" {
			gauge(descPoolGrow, float64(p.Grow))
		}
		for _, c := range p.Counts() {
			counter(descPool, float64(c.Value), c.Name)
		}
	}

	clear(seen)
	for _, p := range s.Peers {
		if seen[p.Key] {
			continue
		}
		seen[p.Key] = true
		gauge(descPeerActive, float64(p.ActiveFlows), p.Key)
		counter(descPeerTotal, float64(p.TotalFlows), p.Key)
		counter(descPeerLimited, float64(p.Limited), p.Key)
		counter(descPeerReplayFull, float64(p.ReplayFull), p.Key)
		if !p.LastSeen.IsZero() {
			gauge(descPeerLastSeen, unixSeconds(p.LastSeen), p.Key)
		}
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func unixSeconds(t time.Time) float64 {
	return float64(t.UnixNano()) / 1e9
}

// MetricsServer serves /metrics until its context is done or Close.
type MetricsServer struct {
	ln   net.Listener
	srv  *http.Server
	done chan struct{}
	err  error // set before done is closed

	closeOnce sync.Once
}

// shutdownTimeout is how long a scrape in progress may take to finish once
// the server is told to stop.
const shutdownTimeout = 2 * time.Second

// ServeMetrics binds addr (host:port; port 0 picks one, see Addr) and
// serves c, with the Go runtime and process collectors, on /metrics from
// its own registry, until ctx is done. It returns once bound, so that a
// taken port is an error before anything else starts. A nil log discards.
func ServeMetrics(ctx context.Context, addr string, c prometheus.Collector, log *slog.Logger) (*MetricsServer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	reg := prometheus.NewRegistry()
	for _, col := range []prometheus.Collector{
		c,
		// With the live heap of the last GC (go_gc_heap_live_bytes):
		// the memory in use that does not swing with the GC cycle.
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/gc/heap/live:bytes$`)})),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(col); err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}

	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slogPrinter{log},
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintln(w, `<html><body><a href="/metrics">mpvpn metrics</a></body></html>`)
	})
	m := &MetricsServer{
		ln: ln,
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      15 * time.Second,
			IdleTimeout:       60 * time.Second,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
		done: make(chan struct{}),
	}
	go m.run(ctx)
	log.Info("metrics listening", "addr", ln.Addr().String())
	return m, nil
}

func (m *MetricsServer) run(ctx context.Context) {
	defer close(m.done)
	served := make(chan error, 1)
	go func() { served <- m.srv.Serve(m.ln) }()
	var err error
	select {
	case err = <-served:
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		if m.srv.Shutdown(sctx) != nil {
			m.srv.Close() // a scrape that would not finish
		}
		cancel()
		err = <-served
	}
	if !errors.Is(err, http.ErrServerClosed) {
		m.err = fmt.Errorf("metrics: %w", err)
	}
}

// Addr is the address bound, with the port chosen if addr asked for 0.
func (m *MetricsServer) Addr() net.Addr { return m.ln.Addr() }

// Done is closed once the server has stopped.
func (m *MetricsServer) Done() <-chan struct{} { return m.done }

// Wait blocks until the server has stopped and tells why, if not because
// it was asked to.
func (m *MetricsServer) Wait() error {
	<-m.done
	return m.err
}

// Close stops the server at once, without waiting for scrapes in progress,
// and waits for it to be stopped.
func (m *MetricsServer) Close() error {
	m.closeOnce.Do(func() { m.srv.Close() })
	return m.Wait()
}

// slogPrinter gives promhttp's error log to slog.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) { p.log.Warn("metrics: " + fmt.Sprint(v...)) }
