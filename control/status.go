//go:build linux

package control

import "time"

// Status is what a running mpvpn reports about itself. Its JSON field names
// are an interface: scripts read them (`mpvpn status --json`), so rename
// none of them.
type Status struct {
	Role    string    `json:"role"` // "client" or "server"
	Version string    `json:"version,omitempty"`
	Started time.Time `json:"started"`
	Server  string    `json:"server,omitempty"`  // client: the concentrator's addr:port
	Listen  string    `json:"listen,omitempty"`  // server: its listener
	Uplinks []Uplink  `json:"uplinks,omitempty"` // client only
	Flows   Flows     `json:"flows"`
	Peers   []Peer    `json:"peers,omitempty"` // server only
	// Fleet: a concentrator that is one of several behind a shared
	// address (mpvpn server --vip).
	Fleet *Fleet `json:"fleet,omitempty"`
	// OpenFlows: the concentrator's open flows, oldest first, at most
	// MaxOpenFlows of them (Flows.Active counts them all). Server only.
	OpenFlows []OpenFlow `json:"open_flows,omitempty"`
	// NetlinkChanges counts the routes, rules and MPTCP endpoints the
	// client's path manager added or removed since start (a flapping
	// uplink must not turn into a storm of them). Client only.
	NetlinkChanges uint64 `json:"netlink_changes,omitempty"`
	// UI is the local dashboard's URL with this start's token (mpvpn
	// client/server --ui); the socket is root-only, as the token is.
	UI string `json:"ui,omitempty"`

	// Handshakes and Verdicts are the server's: why connections did not
	// become flows, and what became of the flows. Stack is the client's
	// netstack. Each is absent on the other side, so a script can tell
	// "not this role" from "zero".
	Handshakes *Handshakes `json:"handshakes,omitempty"`
	Verdicts   *Verdicts   `json:"verdicts,omitempty"`
	Stack      *Stack      `json:"stack,omitempty"`
	// DNS is mpvpn's resolver: on a client, the apps' queries it
	// forwarded; on a server, the queries it resolved for its clients.
	DNS *DNS `json:"dns,omitempty"`
	// UDP is the datagram relay: the applications' UDP datagrams
	// carried (Up: towards the destinations).
	UDP *UDP `json:"udp,omitempty"`
	// Pool is the connections authenticated ahead of any flow: on a
	// client, its pool; on a server, its clients' pooled connections.
	Pool *Pool `json:"pool,omitempty"`
}

// Pool counts connections authenticated before a flow needed them.
type Pool struct {
	Ready    int64  `json:"ready"`   // waiting for a flow now
	Hits     uint64 `json:"hits"`    // client: flows that took one
	Stale    uint64 `json:"stale"`   // client: found closed by the server, skipped
	Expired  uint64 `json:"expired"` // client: retired unused at their age
	Dials    uint64 `json:"dials"`   // client: pooled connections dialled
	Failures uint64 `json:"failures"`
	Limited  uint64 `json:"limited"` // server: answered Limited (the per-client cap)
	Unused   uint64 `json:"unused"`  // server: closed without a flow (idle timeout, client closed)
	// Reused: connections a finished flow left for the next one
	// (client: put back into the pool; server: kept waiting).
	Reused uint64 `json:"reused"`
	// Grow: client: connections kept beyond its --pool for the rate
	// flows open at.
	Grow int64 `json:"grow,omitempty"`
}

// Counts lists the counters, for metrics.
func (p Pool) Counts() []Count {
	return []Count{
		{"hit", p.Hits}, {"stale", p.Stale}, {"expired", p.Expired},
		{"dial", p.Dials}, {"dial_failed", p.Failures},
		{"limited", p.Limited}, {"unused", p.Unused}, {"reused", p.Reused},
	}
}

// UDP counts the datagrams mpvpn relayed.
type UDP struct {
	Streams   uint64 `json:"streams"` // tunnel flows of the datagram service
	Flows     int64  `json:"flows"`   // application sockets with a flow now
	Up        uint64 `json:"up"`      // datagrams towards the destinations
	Down      uint64 `json:"down"`
	UpBytes   uint64 `json:"up_bytes"` // their payload
	DownBytes uint64 `json:"down_bytes"`
	Refused   uint64 `json:"refused"` // refused by the concentrator's policy
	Dropped   uint64 `json:"dropped"` // dropped: a full queue, no stream, a sender the policy refuses
	// The server's: sockets opened (one per flow and address family),
	// flows closed to make room for new ones, datagrams the kernel did
	// not send.
	Sockets    uint64 `json:"sockets,omitempty"`
	Evicted    uint64 `json:"evicted,omitempty"`
	SendErrors uint64 `json:"send_errors,omitempty"`
	// Pings are the echo requests carried, Echoes the replies.
	Pings  uint64 `json:"pings"`
	Echoes uint64 `json:"echoes"`
	// PathOut and PathIn are the packets sent and accepted on the
	// uplinks' own paths (--udp-transport uplinks) rather than in the
	// stream; PathRejected those the server dropped (no session, failed
	// authentication, replayed).
	PathOut      uint64 `json:"path_out"`
	PathIn       uint64 `json:"path_in"`
	PathRejected uint64 `json:"path_rejected,omitempty"`
	// Unreachable are the ICMP errors for datagrams that the server got
	// back from the destinations and the client passed on to the apps.
	Unreachable uint64 `json:"unreachable"`
}

// Counts lists the UDP counters, in a fixed order, with the names of the
// JSON and of the metrics' label.
func (u UDP) Counts() []Count {
	return []Count{{"streams", u.Streams}, {"up", u.Up}, {"down", u.Down}, {"up_bytes", u.UpBytes}, {"down_bytes", u.DownBytes},
		{"refused", u.Refused}, {"dropped", u.Dropped}, {"sockets", u.Sockets}, {"evicted", u.Evicted}, {"send_errors", u.SendErrors},
		{"pings", u.Pings}, {"echoes", u.Echoes}, {"path_out", u.PathOut}, {"path_in", u.PathIn}, {"path_rejected", u.PathRejected}, {"unreachable", u.Unreachable}}
}

// DNS counts the DNS queries mpvpn carried.
type DNS struct {
	Streams uint64 `json:"streams"` // tunnel flows to the resolver: opened (client), served (server)
	Queries uint64 `json:"queries"`
	Failed  uint64 `json:"failed"`  // no answer in time: SERVFAIL
	Dropped uint64 `json:"dropped"` // client: refused because too many were waiting
}

// Counts lists the DNS counters, in a fixed order, with the names of the
// JSON and of the metrics' label.
func (d DNS) Counts() []Count {
	return []Count{{"streams", d.Streams}, {"queries", d.Queries}, {"failed", d.Failed}, {"dropped", d.Dropped}}
}

// Handshakes counts the connections the concentrator's tunnel listener
// accepted and what stopped those that did not become flows. An operator
// under attack reads the reasons here: a scan shows as bad_mac, a replay
// attack as replayed, a flood as evicted and half_open.
type Handshakes struct {
	Accepted uint64 `json:"accepted"`  // connections accepted
	HalfOpen int64  `json:"half_open"` // connections in the handshake now
	Evicted  uint64 `json:"evicted"`   // half-open ones closed early to make room
	// Rejected are the connections closed in silence, by reason.
	Rejected Rejected `json:"rejected"`
	// Limited are the authenticated flows answered Limited, by limit.
	Limited Limited `json:"limited"`
}

// Rejected counts the connections the server closed without answering, by
// reason. Every reason is always present (no omitempty), so that a script
// or a rate() finds a 0 rather than nothing.
type Rejected struct {
	Incomplete   uint64 `json:"incomplete"`    // no complete first message before the deadline
	BadMAC       uint64 `json:"bad_mac"`       // garbage, a scan, or a client with a wrong server key
	BadHandshake uint64 `json:"bad_handshake"` // Noise decryption failed
	UnknownPeer  uint64 `json:"unknown_peer"`  // a valid handshake from a key not configured
	BadPayload   uint64 `json:"bad_payload"`   // authenticated, but the request is malformed
	BadTime      uint64 `json:"bad_time"`      // timestamp outside the window
	Replayed     uint64 `json:"replayed"`      // a first message seen before
	ReplayFull   uint64 `json:"replay_full"`   // the peer's replay cache is full
}

// Count is one named counter of a group, in the group's fixed order.
type Count struct {
	Name  string
	Value uint64
}

// Counts lists every reason, in a fixed order, with the names of the JSON
// and of the metrics' reason label.
func (r Rejected) Counts() []Count {
	return []Count{
		{"incomplete", r.Incomplete},
		{"bad_mac", r.BadMAC},
		{"bad_handshake", r.BadHandshake},
		{"unknown_peer", r.UnknownPeer},
		{"bad_payload", r.BadPayload},
		{"bad_time", r.BadTime},
		{"replayed", r.Replayed},
		{"replay_full", r.ReplayFull},
	}
}

// Limited counts the flows refused by a limit after the handshake: the
// client's app gets a reset at once.
type Limited struct {
	Peer   uint64 `json:"peer"`   // the peer had its maximum of flows open
	Rate   uint64 `json:"rate"`   // the peer opened flows faster than its rate
	Server uint64 `json:"server"` // the server had its maximum of flows open
	// Files: the server ran out of file descriptors (RLIMIT_NOFILE,
	// fs.file-max) connecting to the destination; AcceptFiles, it had
	// none to accept the connection with, and answered on its spare.
	Files       uint64 `json:"files"`
	AcceptFiles uint64 `json:"accept_files"`
}

// Counts lists every limit, in a fixed order, with the names of the JSON
// and of the metrics' limit label.
func (l Limited) Counts() []Count {
	return []Count{{"peer", l.Peer}, {"rate", l.Rate}, {"server", l.Server}, {"files", l.Files}, {"accept_files", l.AcceptFiles}}
}

// Verdicts counts what became of the flows the concentrator was handed.
type Verdicts struct {
	Connected   uint64 `json:"connected"`
	Refused     uint64 `json:"refused"` // the destination refused
	Unreachable uint64 `json:"unreachable"`
	TimedOut    uint64 `json:"timed_out"`
	NotAllowed  uint64 `json:"not_allowed"` // refused by policy; no dial was made
}

// Counts lists every verdict, in a fixed order, with the names of the JSON
// and of the metrics' verdict label.
func (v Verdicts) Counts() []Count {
	return []Count{
		{"connected", v.Connected},
		{"refused", v.Refused},
		{"unreachable", v.Unreachable},
		{"timed_out", v.TimedOut},
		{"not_allowed", v.NotAllowed},
	}
}

// Stack is the client's netstack, where the apps' SYNs arrive.
type Stack struct {
	InFlight int `json:"in_flight"` // SYNs being forwarded now
	// SYNLimited counts SYNs answered with a reset because the cap on
	// SYNs in flight was reached: an app (or malware) opening connections
	// faster than the concentrator answers.
	SYNLimited uint64 `json:"syn_limited"`
	// TimeWaitRetired counts new SYNs that found the endpoint of an
	// earlier flow on their 4-tuple in TIME_WAIT and retired it: an app
	// reusing its port toward the same destination.
	TimeWaitRetired uint64 `json:"time_wait_retired"`
}

// Uplink states.
const (
	StateUp        = "up"
	StateDown      = "down"
	StateWithdrawn = "withdrawn"
)

// Uplink is one of the client's paths to the concentrator.
type Uplink struct {
	Name        string    `json:"name"`
	State       string    `json:"state"` // StateUp, StateDown or StateWithdrawn
	Reason      string    `json:"reason,omitempty"`
	Backup      bool      `json:"backup"`
	Addr        string    `json:"addr,omitempty"`
	Gateway     string    `json:"gateway,omitempty"`
	Since       time.Time `json:"since"`
	Transitions uint64    `json:"transitions"`
	RxBytes     uint64    `json:"rx_bytes"` // this uplink's share of mpvpn's flows
	TxBytes     uint64    `json:"tx_bytes"`
	RxRate      float64   `json:"rx_bps"` // bits per second, over the last interval
	TxRate      float64   `json:"tx_bps"`
	Subflows    int       `json:"subflows"`
	RTT         float64   `json:"rtt_ms"`    // smoothed, of its subflows (0 if none)
	Fallbacks   uint64    `json:"fallbacks"` // flows on plain TCP that started on this uplink
	ProbeAlive  bool      `json:"probe_alive"`
	ProbeRTT    float64   `json:"probe_rtt_ms"`
	// ProbesSent and ProbesReceived count this uplink's probes and
	// their replies since it was last (re)started from an address.
	ProbesSent     uint64 `json:"probes_sent"`
	ProbesReceived uint64 `json:"probes_received"`
}

// Flows counts the TCP flows mpvpn carries, on either side.
type Flows struct {
	Active    int64  `json:"active"`
	Total     uint64 `json:"total"` // opened since start
	Failed    uint64 `json:"failed"`
	Rejected  uint64 `json:"rejected"` // refused by a limit or, on the server, by policy
	Fallbacks uint64 `json:"fallbacks"`
	RxBytes   uint64 `json:"rx_bytes"`
	TxBytes   uint64 `json:"tx_bytes"`
	// Ciphers: the transport ciphers this end offers (client) or takes
	// (server), preferred first; AESGCM: flows sealed with AES-256-GCM
	// (the others use ChaCha20-Poly1305).
	Ciphers []string `json:"ciphers,omitempty"`
	AESGCM  uint64   `json:"aes_gcm"`
}

// Peer is a client as the concentrator sees it.
type Peer struct {
	Key         string    `json:"key"`
	ActiveFlows int64     `json:"active_flows"`
	TotalFlows  uint64    `json:"total_flows"`
	LastSeen    time.Time `json:"last_seen,omitzero"` // omitempty never omits a struct; omitzero does
	// Limited counts the peer's flows answered Limited (any limit);
	// ReplayFull its handshakes dropped because its replay cache was full.
	Limited    uint64 `json:"limited"`
	ReplayFull uint64 `json:"replay_full"`
}

// Fleet is a fleet member's view of the fleet: the shared addresses
// clients dial (joins refused there) and the member's own addresses its
// connections announce for joins instead.
type Fleet struct {
	VIP      []string `json:"vip"`
	Announce []string `json:"announce"`
}

// MaxOpenFlows is how many open flows a server's status lists.
const MaxOpenFlows = 4096

// OpenFlow is one open flow: on a concentrator, one it relays (Peer and
// Client set); on a client, one it carries, with its bytes and how its
// uplinks share them (RxBytes to Paths set), from the last sample.
type OpenFlow struct {
	Peer   string    `json:"peer,omitempty"`   // server: the client's key
	Client string    `json:"client,omitempty"` // server: the address its connection came from
	Dst    string    `json:"dst"`              // destination, or the service ("dns", "udp")
	Since  time.Time `json:"since"`
	// Client: bytes of the flow's MPTCP connection on its subflows
	// (framing included), and their rates over the last interval.
	RxBytes uint64     `json:"rx_bytes,omitempty"`
	TxBytes uint64     `json:"tx_bytes,omitempty"`
	RxRate  float64    `json:"rx_bps,omitempty"`
	TxRate  float64    `json:"tx_bps,omitempty"`
	Paths   []FlowPath `json:"paths,omitempty"`
}

// FlowPath is one uplink's part of a client's flow.
type FlowPath struct {
	Uplink   string `json:"uplink"` // its name, or the local address if no uplink has it now
	Subflows int    `json:"subflows"`
	RxBytes  uint64 `json:"rx_bytes"`
	TxBytes  uint64 `json:"tx_bytes"`
}
