//go:build linux

package control

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// Render writes s for a human: a header with the role, the far end, the
// uptime, the flow counters and (server) the handshakes and verdicts or
// (client) the netstack, then a row per uplink (client) or per peer
// (server). With prev, the status read interval earlier, rates that s does
// not report itself are worked out from the byte counters; with prev nil
// they are shown as s gives them.
func Render(w io.Writer, s Status, prev *Status, interval time.Duration) error {
	return renderAt(w, s, prev, interval, time.Now())
}

func renderAt(w io.Writer, s Status, prev *Status, interval time.Duration, now time.Time) error {
	var b strings.Builder
	b.WriteString("mpvpn " + orDash(s.Role))
	if s.Version != "" {
		b.WriteString(" " + s.Version)
	}
	switch {
	case s.Server != "":
		b.WriteString(", concentrator " + s.Server)
	case s.Listen != "":
		b.WriteString(", listening on " + s.Listen)
	}
	if !s.Started.IsZero() {
		b.WriteString(", up " + humanDuration(now.Sub(s.Started)))
	}
	b.WriteString("\n")

	if s.UI != "" {
		fmt.Fprintf(&b, "dashboard: %s\n", s.UI)
	}
	if fl := s.Fleet; fl != nil {
		fmt.Fprintf(&b, "fleet: clients dial %s (joins refused there), their subflows join %s here\n",
			strings.Join(fl.VIP, ", "), strings.Join(fl.Announce, ", "))
	}
	f := s.Flows
	fmt.Fprintf(&b, "flows: %d active, %d total, %d failed, %d rejected, %d on plain TCP",
		f.Active, f.Total, f.Failed, f.Rejected, f.Fallbacks)
	if len(f.Ciphers) > 0 {
		fmt.Fprintf(&b, ", %d sealed with aes-256-gcm (%s: %s)", f.AESGCM, map[string]string{"client": "offers", "server": "takes"}[s.Role], strings.Join(f.Ciphers, ", "))
	}
	fmt.Fprintf(&b, "; rx %s, tx %s", humanBytes(f.RxBytes), humanBytes(f.TxBytes))
	if prev != nil && interval > 0 {
		fmt.Fprintf(&b, "; now rx %s, tx %s",
			humanRate(deltaRate(f.RxBytes, prev.Flows.RxBytes, interval)),
			humanRate(deltaRate(f.TxBytes, prev.Flows.TxBytes, interval)))
	}
	b.WriteString("\n")
	if h := s.Handshakes; h != nil {
		fmt.Fprintf(&b, "handshakes: %d accepted, %d half-open, %d evicted; rejected: %s; limited: %s\n",
			h.Accepted, h.HalfOpen, h.Evicted, nonzero(h.Rejected.Counts()), nonzero(h.Limited.Counts()))
	}
	if v := s.Verdicts; v != nil {
		fmt.Fprintf(&b, "verdicts: %d connected, %d refused, %d unreachable, %d timed out, %d not allowed\n",
			v.Connected, v.Refused, v.Unreachable, v.TimedOut, v.NotAllowed)
	}
	if st := s.Stack; st != nil {
		fmt.Fprintf(&b, "stack: %d SYNs in flight, %d refused over the in-flight cap, %d reopened a port in TIME_WAIT\n", st.InFlight, st.SYNLimited, st.TimeWaitRetired)
	}
	if d := s.DNS; d != nil {
		fmt.Fprintf(&b, "dns: %d queries, %d failed, %d dropped, %d tunnel streams\n", d.Queries, d.Failed, d.Dropped, d.Streams)
	}
	if u := s.UDP; u != nil {
		fmt.Fprintf(&b, "udp: %d flows; %d datagrams up (%s), %d down (%s), %d refused, %d dropped; %d pings, %d echoes; %d tunnel streams\n",
			u.Flows, u.Up, humanBytes(u.UpBytes), u.Down, humanBytes(u.DownBytes), u.Refused, u.Dropped, u.Pings, u.Echoes, u.Streams)
	}
	if p := s.Pool; p != nil {
		if s.Role == "server" {
			fmt.Fprintf(&b, "pool: %d connections waiting for a flow; %d over the per-client cap, %d closed unused, %d kept after their flow\n", p.Ready, p.Limited, p.Unused, p.Reused)
		} else {
			fmt.Fprintf(&b, "pool: %d ready (%d beyond --pool for the flow rate); %d flows took one, %d stale, %d expired; %d dialled, %d failed; %d put back after their flow\n", p.Ready, p.Grow, p.Hits, p.Stale, p.Expired, p.Dials, p.Failures, p.Reused)
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}

	if len(s.Uplinks) > 0 {
		if _, err := io.WriteString(w, "\n"); err != nil {
			return err
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "UPLINK\tSTATE\tSINCE\tADDR\tRX\tTX\tRX-RATE\tTX-RATE\tSUBFLOWS\tRTT\tPROBE")
		for _, u := range s.Uplinks {
			rx, tx := u.RxRate, u.TxRate
			if p := prevUplink(prev, u.Name); p != nil && interval > 0 {
				if rx == 0 {
					rx = deltaRate(u.RxBytes, p.RxBytes, interval)
				}
				if tx == 0 {
					tx = deltaRate(u.TxBytes, p.TxBytes, interval)
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n",
				u.Name, uplinkState(u), since(now, u.Since), orDash(u.Addr),
				humanBytes(u.RxBytes), humanBytes(u.TxBytes), humanRate(rx), humanRate(tx),
				u.Subflows, millis(u.RTT), probe(u))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}

	if len(s.Peers) > 0 {
		if _, err := io.WriteString(w, "\n"); err != nil {
			return err
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "PEER\tACTIVE\tTOTAL\tLIMITED\tREPLAY-FULL\tLAST-SEEN")
		for _, p := range s.Peers {
			seen := "never"
			if !p.LastSeen.IsZero() {
				seen = since(now, p.LastSeen) + " ago"
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\n", p.Key, p.ActiveFlows, p.TotalFlows, p.Limited, p.ReplayFull, seen)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// nonzero shows the counters that are not zero, "bad_mac 12, replayed 3",
// or "none": under attack one or two reasons stand out, and a row of
// zeros would hide them.
func nonzero(cs []Count) string {
	var parts []string
	for _, c := range cs {
		if c.Value != 0 {
			parts = append(parts, fmt.Sprintf("%s %d", c.Name, c.Value))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func prevUplink(prev *Status, name string) *Uplink {
	if prev == nil {
		return nil
	}
	for i := range prev.Uplinks {
		if prev.Uplinks[i].Name == name {
			return &prev.Uplinks[i]
		}
	}
	return nil
}

// deltaRate is bits per second between two byte counters; a counter that
// went backwards (a restart) gives 0.
func deltaRate(cur, prev uint64, interval time.Duration) float64 {
	if cur < prev || interval <= 0 {
		return 0
	}
	return float64(cur-prev) * 8 / interval.Seconds()
}

func uplinkState(u Uplink) string {
	s := orDash(u.State)
	if u.Backup {
		s += " (backup)"
	}
	if u.Reason != "" {
		s += ": " + u.Reason
	}
	return s
}

func probe(u Uplink) string {
	if !u.ProbeAlive {
		return "lost"
	}
	return "ok " + millis(u.ProbeRTT)
}

func since(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return humanDuration(now.Sub(t))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// millis shows a round-trip time given in milliseconds; 0 means none.
func millis(ms float64) string {
	switch {
	case ms <= 0:
		return "-"
	case ms < 10:
		return fmt.Sprintf("%.1f ms", ms)
	default:
		return fmt.Sprintf("%.0f ms", ms)
	}
}

// humanDuration is d in its two largest units: "42s", "3m4s", "1h59m",
// "2d1h". Watching, the seconds matter only for the first hour.
func humanDuration(d time.Duration) string {
	d = max(d, 0).Round(time.Second)
	switch day := 24 * time.Hour; {
	case d >= day:
		return fmt.Sprintf("%dd%dh", d/day, d%day/time.Hour)
	case d >= time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	case d >= time.Minute:
		return fmt.Sprintf("%dm%ds", d/time.Minute, d%time.Minute/time.Second)
	default:
		return fmt.Sprintf("%ds", d/time.Second)
	}
}

// humanBytes uses binary prefixes: "512 B", "1.5 KiB", "3.2 GiB".
func humanBytes(n uint64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, unit := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= 1024
		if v < 1024 || unit == "PiB" {
			return fmt.Sprintf("%.1f %s", v, unit)
		}
	}
	panic("unreachable")
}

// humanRate uses decimal prefixes, as link speeds do: "0 bit/s",
// "640 bit/s", "12.5 Mbit/s".
func humanRate(bps float64) string {
	if bps < 1000 {
		return fmt.Sprintf("%.0f bit/s", max(bps, 0))
	}
	for _, unit := range []string{"kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"} {
		bps /= 1000
		if bps < 1000 || unit == "Tbit/s" {
			return fmt.Sprintf("%.1f %s", bps, unit)
		}
	}
	panic("unreachable")
}

// RenderFlows writes the open flows, one a line, oldest first (`mpvpn
// status --flows`): a server's with the client and the address it came
// from, a client's with its bytes, rates and each uplink's share.
func RenderFlows(w io.Writer, s Status) error {
	return renderFlowsAt(w, s, time.Now())
}

func renderFlowsAt(w io.Writer, s Status, now time.Time) error {
	var b strings.Builder
	fmt.Fprintf(&b, "open flows: %d", s.Flows.Active)
	if int64(len(s.OpenFlows)) < s.Flows.Active {
		fmt.Fprintf(&b, " (the oldest %d listed)", len(s.OpenFlows))
	}
	b.WriteString("\n")
	for _, f := range s.OpenFlows {
		if s.Role == "server" {
			fmt.Fprintf(&b, "  %s  from %s  to %s  for %s", f.Peer, f.Client, f.Dst, humanDuration(now.Sub(f.Since)))
			if len(f.Paths) > 0 {
				fmt.Fprintf(&b, "  in %s  out %s  %s", humanBytes(f.RxBytes), humanBytes(f.TxBytes), pathShares(f))
			}
			b.WriteString("\n")
			continue
		}
		fmt.Fprintf(&b, "  to %s  for %s  down %s (%s)  up %s (%s)  %s\n", f.Dst, humanDuration(now.Sub(f.Since)),
			humanBytes(f.RxBytes), humanRate(f.RxRate), humanBytes(f.TxBytes), humanRate(f.TxRate), pathShares(f))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// pathShares tells how a flow is spread over its paths (a client's
// uplinks, or on a server the client's addresses): each one's share of
// the bytes both ways, and its subflows.
func pathShares(f OpenFlow) string {
	total := f.RxBytes + f.TxBytes
	parts := make([]string, 0, len(f.Paths))
	for _, p := range f.Paths {
		share := "-"
		if total > 0 {
			share = fmt.Sprintf("%.0f%%", 100*float64(p.RxBytes+p.TxBytes)/float64(total))
		}
		sub := "subflows"
		if p.Subflows == 1 {
			sub = "subflow"
		}
		parts = append(parts, fmt.Sprintf("%s %s (%d %s)", p.Uplink, share, p.Subflows, sub))
	}
	if len(parts) == 0 {
		return "no subflow"
	}
	return strings.Join(parts, ", ")
}
