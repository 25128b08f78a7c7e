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
	// NetlinkChanges counts the routes, rules and MPTCP endpoints the
	// client's path manager added or removed since start (a flapping
	// uplink must not turn into a storm of them). Client only.
	NetlinkChanges uint64 `json:"netlink_changes,omitempty"`
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
}

// Flows counts the TCP flows mpvpn carries, on either side.
type Flows struct {
	Active    int64  `json:"active"`
	Total     uint64 `json:"total"` // opened since start
	Failed    uint64 `json:"failed"`
	Rejected  uint64 `json:"rejected"`
	Fallbacks uint64 `json:"fallbacks"`
	RxBytes   uint64 `json:"rx_bytes"`
	TxBytes   uint64 `json:"tx_bytes"`
}

// Peer is a client as the concentrator sees it.
type Peer struct {
	Key         string    `json:"key"`
	ActiveFlows int64     `json:"active_flows"`
	TotalFlows  uint64    `json:"total_flows"`
	LastSeen    time.Time `json:"last_seen,omitzero"` // omitempty never omits a struct; omitzero does
}
