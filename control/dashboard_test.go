//go:build linux

package control

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// dashboardPath is the Grafana dashboard of the repository (README,
// "Watching it").
const dashboardPath = "../grafana/mpvpn.json"

type grafanaPanel struct {
	ID      int            `json:"id"`
	Type    string         `json:"type"`
	Title   string         `json:"title"`
	Targets []grafanaQuery `json:"targets"`
	Panels  []grafanaPanel `json:"panels"` // a row's
}

type grafanaQuery struct {
	Expr         string `json:"expr"`
	LegendFormat string `json:"legendFormat"`
}

var (
	metricRE = regexp.MustCompile(`\bmpvpn_[a-z0-9_]+\b`)
	legendRE = regexp.MustCompile(`\{\{\s*([a-z_]+)\s*\}\}`)
	byRE     = regexp.MustCompile(`\bby\s*\(([^)]*)\)`)
	descRE   = regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)
)

// Every metric the dashboard queries is one mpvpn serves (the client's
// or the concentrator's), and every label a panel groups by or names in
// its legend is one of that metric's (or instance/job, which Prometheus
// adds); every panel has a query.
func TestDashboardQueriesServedMetrics(t *testing.T) {
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title      string         `json:"title"`
		UID        string         `json:"uid"`
		Panels     []grafanaPanel `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Errorf("dashboard without title or uid")
	}

	// What mpvpn serves: every metric the collector describes, with its
	// labels. A Desc shows its name and labels only in String()
	// (client_golang v1, 2026-12: `Desc{fqName: "…", help: "…",
	// constLabels: {…}, variableLabels: {a,b}}`); a change of that form
	// fails here, loudly, rather than passing.
	labels := map[string][]string{}
	ch := make(chan *prometheus.Desc, 256)
	NewCollector(clientStatus).Describe(ch)
	close(ch)
	for d := range ch {
		m := descRE.FindStringSubmatch(d.String())
		if m == nil {
			t.Fatalf("cannot read the name and labels of %s", d)
		}
		var ls []string
		if m[2] != "" {
			ls = strings.Split(m[2], ",")
		}
		labels[m[1]] = ls
	}
	if len(labels) < 30 {
		t.Fatalf("the collector describes %d metrics; the test reads them wrong", len(labels))
	}

	var panels []grafanaPanel
	for _, p := range dash.Panels {
		panels = append(panels, p)
		panels = append(panels, p.Panels...)
	}
	ids := map[int]bool{}
	queried := map[string]bool{}
	for _, p := range panels {
		if ids[p.ID] {
			t.Errorf("panel %q: id %d used twice", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			if strings.Count(q.Expr, "(") != strings.Count(q.Expr, ")") || strings.Count(q.Expr, "{") != strings.Count(q.Expr, "}") {
				t.Errorf("panel %q: unbalanced query %q", p.Title, q.Expr)
			}
			names := metricRE.FindAllString(q.Expr, -1)
			if len(names) == 0 {
				t.Errorf("panel %q: query %q names no mpvpn metric", p.Title, q.Expr)
			}
			allowed := []string{"instance", "job"}
			for _, n := range names {
				l, ok := labels[n]
				if !ok {
					t.Errorf("panel %q: %s is not served by mpvpn's /metrics", p.Title, n)
				}
				queried[n] = true
				allowed = append(allowed, l...)
			}
			var used []string
			for _, m := range legendRE.FindAllStringSubmatch(q.LegendFormat, -1) {
				used = append(used, m[1])
			}
			for _, m := range byRE.FindAllStringSubmatch(q.Expr, -1) {
				for _, l := range strings.Split(m[1], ",") {
					used = append(used, strings.TrimSpace(l))
				}
			}
			for _, l := range used {
				if !slices.Contains(allowed, l) {
					t.Errorf("panel %q: label %q is not one of %v's", p.Title, l, names)
				}
			}
		}
	}
	for _, v := range dash.Templating.List {
		for _, n := range metricRE.FindAllString(v.Definition, -1) {
			if _, ok := labels[n]; !ok {
				t.Errorf("variable query %q: %s is not served", v.Definition, n)
			}
		}
	}
	t.Logf("%d panels query %d of the %d metrics mpvpn serves", len(panels), len(queried), len(labels))
}
