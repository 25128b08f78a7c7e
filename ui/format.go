//go:build linux

package ui

import (
	"fmt"
	"html/template"
	"time"

	"github.com/mpvpn/mpvpn/control"
)

// pageData is what the page's template renders: the page is whole
// before any script runs (and without one), and the script keeps it live.
type pageData struct {
	Status   control.Status
	Now      time.Time
	Interval time.Duration
}

var funcs = template.FuncMap{
	"rate":  rate,
	"bytes": bytes,
	"age": func(now, t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return now.Sub(t).Round(time.Second).String()
	},
	"ms": func(v float64) string {
		if v <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f ms", v)
	},
	"share": func(f control.OpenFlow, p control.FlowPath) string {
		if t := f.RxBytes + f.TxBytes; t > 0 {
			return fmt.Sprintf("%.0f%%", 100*float64(p.RxBytes+p.TxBytes)/float64(t))
		}
		return "-"
	},
	"millis": func(d time.Duration) int64 { return d.Milliseconds() },
}

// rate is as the page's script writes it (app.js fmtRate).
func rate(bps float64) string {
	switch {
	case bps >= 1e9:
		return fmt.Sprintf("%.2f Gbit/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%.1f Mbit/s", bps/1e6)
	case bps >= 1e3:
		return fmt.Sprintf("%.0f kbit/s", bps/1e3)
	}
	return fmt.Sprintf("%.0f bit/s", max(bps, 0))
}

// bytes is as app.js fmtBytes writes it.
func bytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
