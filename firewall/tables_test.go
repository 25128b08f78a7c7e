//go:build linux

package firewall

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/internal/netnstest"
)

// foreign adds tables that are not mpvpn's: one of another name, and one
// named like mpvpn's per-app table but of another family.
func foreign(t *testing.T) {
	t.Helper()
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(`
table inet somebody-else {
	chain output {
		type filter hook output priority 10; policy accept;
		counter
	}
}
table ip mpvpn {
	chain c {
		counter
	}
}
`)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("add foreign tables: %v: %s", err, out)
	}
}

func tables(t *testing.T) string {
	t.Helper()
	return strings.TrimSpace(nft(t, "list", "tables"))
}

// TestTables: Apply is one transaction and idempotent; Update replaces in
// one transaction too; Close leaves the kill switch; Cleanup after a
// simulated crash lists and removes exactly mpvpn's two tables, and the
// ruleset is as it was, foreign tables included.
func TestTables(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		foreign(t)
		before := ruleset(t)
		cfg := Config{
			Mark:       own,
			Rules:      []Rule{{UID(uidA), Tunnel}, {UID(uidB), Direct}, {UID(uidC), Block}},
			KillSwitch: &KillSwitch{TUN: "mpvpn0", AllowLAN: true, LAN: lanPrefix},
		}

		g0 := generation(t)
		f, err := Apply(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if g := generation(t); g != g0+1 {
			t.Errorf("Apply took %d transactions, want 1", g-g0)
		}
		applied := ruleset(t)
		if want := "table inet somebody-else\ntable ip mpvpn\ntable inet mpvpn\ntable inet mpvpn-killswitch"; tables(t) != want {
			t.Errorf("tables after Apply:\n%s\nwant:\n%s", tables(t), want)
		}

		// The next start: a new Firewall over the tables left in place.
		g1 := generation(t)
		f2, err := Apply(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if got := ruleset(t); got != applied {
			t.Errorf("Apply twice changed the ruleset:\nonce:\n%s\ntwice:\n%s", applied, got)
		}
		if err := f2.Update(cfg); err != nil {
			t.Fatal(err)
		}
		if got := ruleset(t); got != applied {
			t.Errorf("Update with the same config changed the ruleset")
		}
		if g := generation(t); g != g1+2 {
			t.Errorf("Apply and Update took %d transactions, want 2", g-g1)
		}

		// A changed rule list and the kill switch turned off: one
		// transaction again.
		less := cfg
		less.Rules = cfg.Rules[:1]
		less.KillSwitch = nil
		g2 := generation(t)
		if err := f2.Update(less); err != nil {
			t.Fatal(err)
		}
		if g := generation(t); g != g2+1 {
			t.Errorf("Update took %d transactions, want 1", g-g2)
		}
		got := ruleset(t)
		if strings.Contains(got, "61002") || strings.Contains(got, KillSwitchTable) || !strings.Contains(got, "61001") {
			t.Errorf("after Update to one rule and no kill switch:\n%s", got)
		}
		if err := f2.Update(cfg); err != nil {
			t.Fatal(err)
		}

		// Close removes the per-app table only.
		if err := f2.Close(); err != nil {
			t.Fatal(err)
		}
		if want := "table inet somebody-else\ntable ip mpvpn\ntable inet mpvpn-killswitch"; tables(t) != want {
			t.Errorf("tables after Close:\n%s\nwant:\n%s", tables(t), want)
		}
		if err := f2.Close(); err != nil {
			t.Errorf("Close twice: %v", err)
		}
		if err := f2.RemoveKillSwitch(); err == nil {
			t.Errorf("RemoveKillSwitch after Close returned nil")
		}
		// f was never closed, and its tables were replaced under it:
		// RemoveKillSwitch still removes the one that is there.
		if err := f.RemoveKillSwitch(); err != nil {
			t.Fatal(err)
		}
		if want := "table inet somebody-else\ntable ip mpvpn"; tables(t) != want {
			t.Errorf("tables after RemoveKillSwitch:\n%s\nwant:\n%s", tables(t), want)
		}
		if err := f.Close(); err != nil {
			t.Errorf("Close with the per-app table already gone: %v", err)
		}
		if got := ruleset(t); got != before {
			t.Errorf("after Close and RemoveKillSwitch:\n%s\nwant:\n%s", got, before)
		}

		// A crash: applied, never closed.
		if _, err := Apply(cfg); err != nil {
			t.Fatal(err)
		}
		lines, err := Cleanup()
		if err != nil {
			t.Fatal(err)
		}
		if want := "nftables table inet mpvpn\nnftables table inet mpvpn-killswitch"; strings.Join(lines, "\n") != want {
			t.Errorf("Cleanup: %q, want %q", lines, want)
		}
		if got := ruleset(t); got != before {
			t.Errorf("Cleanup left:\n%s\nwant:\n%s", got, before)
		}
		if lines, err := Cleanup(); err != nil || len(lines) != 0 {
			t.Errorf("Cleanup with nothing to do: %q, %v", lines, err)
		}
	})
}

// TestRefusedTransactionChangesNothing: when the kernel refuses the batch
// (here a cgroup level it does not support), neither table changes: the
// old kill switch stays in force.
func TestRefusedTransactionChangesNothing(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		cfg := Config{Mark: own, Rules: []Rule{{UID(uidA), Tunnel}}, KillSwitch: &KillSwitch{TUN: "mpvpn0"}}
		f, err := Apply(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer Cleanup()
		before, g0 := ruleset(t), generation(t)
		r, err := (&Config{Mark: own, KillSwitch: &KillSwitch{TUN: "other0"}}).resolve(slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		r.rules = []resolvedRule{{Rule: Rule{Cgroup("/x"), Direct}, n: 1, cgroup: cgroup.Cgroup{Path: "/x", ID: 1, Level: 300}}}
		if err := f.commit(r); err == nil {
			t.Fatal("the kernel took a cgroup level of 300")
		} else {
			t.Logf("refused as expected: %v", err)
		}
		if got := ruleset(t); got != before || generation(t) != g0 {
			t.Errorf("a refused transaction changed the ruleset:\nbefore:\n%s\nafter:\n%s", before, got)
		}
		if !strings.Contains(before, `oifname "mpvpn0" accept`) {
			t.Errorf("the kill switch for mpvpn0 is not in force:\n%s", before)
		}
	})
}

func TestConfigErrors(t *testing.T) {
	m, err := cgroup.Mount()
	if err != nil {
		m = "/nonexistent"
	}
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no mark", Config{}, "fwmark 0"},
		{"mark too large", Config{Mark: 0xfffffffe}, "must fit in 32 bits"},
		{"no action", Config{Mark: own, Rules: []Rule{{Selector: UID(1)}}}, "rule 1 (uid 1): no action"},
		{"no selector", Config{Mark: own, Rules: []Rule{{Action: Block}}}, "rule 1: no selector"},
		{"invalid uid", Config{Mark: own, Rules: []Rule{{UID(0xffffffff), Block}}}, "invalid uid"},
		{"duplicate", Config{Mark: own, Rules: []Rule{{UID(5), Block}, {UID(6), Direct}, {UID(5), Direct}}}, "rule 3 repeats the selector of rule 1 (uid 5)"},
		{"missing cgroup", Config{Mark: own, CgroupMount: m, Rules: []Rule{{Cgroup("/mpvpn-test-no-such/x"), Direct}}}, "rule 1 (cgroup /mpvpn-test-no-such/x): cgroup /mpvpn-test-no-such/x does not exist"},
		{"relative cgroup", Config{Mark: own, CgroupMount: m, Rules: []Rule{{Cgroup("system.slice"), Direct}}}, "must start with /"},
		{"no TUN", Config{Mark: own, KillSwitch: &KillSwitch{}}, "kill switch: TUN: no interface named"},
		{"long TUN", Config{Mark: own, KillSwitch: &KillSwitch{TUN: "a-very-long-name0"}}, "longer than 15"},
		{"lo as TUN", Config{Mark: own, KillSwitch: &KillSwitch{TUN: "lo"}}, "loopback"},
		{"bad LAN", Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0", AllowLAN: true, LAN: []netip.Prefix{{}}}}, "not valid"},
	} {
		_, err := c.cfg.resolve(slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.name, err, c.want)
		}
	}
	if _, err := (&Config{Mark: own, CgroupMount: m, Rules: []Rule{{Cgroup("/mpvpn-test-no-such"), Block}}}).resolve(slog.New(slog.DiscardHandler)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing cgroup: %v, want fs.ErrNotExist", err)
	}
	// Apply refuses before it touches anything (no namespace needed).
	if _, err := Apply(Config{}); err == nil || !strings.HasPrefix(err.Error(), "firewall: ") {
		t.Errorf("Apply(Config{}): %v", err)
	}
}

func TestLANPrefixes(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	r, err := (&Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0", AllowLAN: true, LAN: []netip.Prefix{
		netip.MustParsePrefix("192.168.1.0/24"),
		netip.MustParsePrefix("192.168.1.7/24"), // host bits: the same LAN
		netip.MustParsePrefix("::ffff:10.1.0.0/112"),
		netip.MustParsePrefix("fd12:3456::/48"),
		netip.MustParsePrefix("fe80::/64"),
		netip.MustParsePrefix("8.8.8.0/24"),    // public: a rogue "LAN"
		netip.MustParsePrefix("10.0.0.0/7"),    // covers 11/8, public
		netip.MustParsePrefix("2001:db8::/32"), // global IPv6
		netip.MustParsePrefix("100.64.0.0/10"), // the carrier's, not a LAN
	}}}).resolve(log)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range r.ks.lan {
		got = append(got, p.String())
	}
	if want := "192.168.1.0/24 10.1.0.0/16 fd12:3456::/48 fe80::/64"; strings.Join(got, " ") != want {
		t.Errorf("LAN prefixes used: %s, want %s", strings.Join(got, " "), want)
	}
	for _, p := range []string{"8.8.8.0/24", "10.0.0.0/7", "2001:db8::/32", "100.64.0.0/10"} {
		if !strings.Contains(logs.String(), "prefix="+p) {
			t.Errorf("no warning for %s: %s", p, logs.String())
		}
	}
	// Not allowed: no LAN rules at all, whatever the prefixes.
	r, _ = (&Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0", LAN: lanPrefix}}).resolve(log)
	if r.ks.lan != nil {
		t.Errorf("LAN not allowed, but prefixes used: %v", r.ks.lan)
	}
}

func TestParseAction(t *testing.T) {
	for _, a := range []Action{Tunnel, Direct, Block} {
		if got, err := ParseAction(a.String()); err != nil || got != a {
			t.Errorf("ParseAction(%q) = %v, %v", a, got, err)
		}
	}
	if _, err := ParseAction("bypass"); err == nil {
		t.Error("ParseAction(bypass) returned nil")
	}
}
