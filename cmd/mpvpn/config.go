//go:build linux

package main

import (
	"fmt"
	"sort"

	"github.com/BurntSushi/toml"
	"github.com/urfave/cli/v2"
)

var configFlag = &cli.PathFlag{
	Name:  "config",
	Usage: "read flags from this TOML `FILE` (keys are the flag names; the command line wins)",
}

// loadConfig fills every flag not given on the command line from the TOML
// file named by --config. Unknown keys are an error: a misspelt option that
// silently does nothing is how a VPN ends up not routing what its user
// thinks it routes.
func loadConfig(c *cli.Context) error {
	path := c.Path("config")
	if path == "" {
		return nil
	}
	var raw map[string]any
	if _, err := toml.DecodeFile(path, &raw); err != nil {
		return fmt.Errorf("--config %s: %w", path, err)
	}
	known := map[string]bool{}
	for _, f := range c.Command.Flags {
		for _, n := range f.Names() {
			known[n] = true
		}
	}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !known[k] || k == "config" {
			return fmt.Errorf("--config %s: unknown key %q (keys are the flag names of `mpvpn %s`)", path, k, c.Command.Name)
		}
		if c.IsSet(k) {
			continue
		}
		var vals []string
		switch v := raw[k].(type) {
		case []any:
			for _, e := range v {
				vals = append(vals, fmt.Sprint(e))
			}
		default:
			vals = []string{fmt.Sprint(v)}
		}
		for _, s := range vals {
			if err := c.Set(k, s); err != nil {
				return fmt.Errorf("--config %s: key %q: %w", path, k, err)
			}
		}
	}
	return nil
}
