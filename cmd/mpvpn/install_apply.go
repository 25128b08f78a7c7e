//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/mpvpn/mpvpn/internal/unit"
)

// install checks everything first (the configuration, the key, what is at
// the install paths) and writes nothing unless all is well; a write that
// fails half-way puts back what was there.
func (in *installer) install(ctx context.Context, role, configPath, bin string) error {
	p, err := in.plan(ctx, role, configPath, bin)
	if err != nil {
		return err
	}
	for _, n := range p.notes {
		in.say("%s", n)
	}
	changed, err := in.apply(p)
	if err != nil {
		return fmt.Errorf("install %s: %w", role, err)
	}
	return in.start(ctx, role, changed)
}

// installPlan is what install is to write, and what it found there.
type installPlan struct {
	changes []change
	states  []state  // of each change's path, before
	notes   []string // said before anything is written
}

func (in *installer) plan(ctx context.Context, role, configPath, bin string) (*installPlan, error) {
	dc, err := readDaemonConfig(ctx, role, configPath)
	if err != nil {
		return nil, err
	}
	key, err := readKeyFile(dc.key)
	if err != nil {
		return nil, err
	}
	low, err := bindsLowPort(dc.listens)
	if err != nil {
		return nil, fmt.Errorf("--config %s: %w", configPath, err)
	}
	source, err := filepath.Abs(configPath)
	if err != nil {
		return nil, err
	}
	if err := in.checkEtcDir(); err != nil {
		return nil, err
	}

	// Whether the key at the install path is install's own copy is
	// written in the installed configuration's header; one that the
	// configuration already names there is the administrator's.
	oldConfig, _ := os.ReadFile(in.at(installedConfig(role)))
	oldKeyLine := copiedKeyLine(oldConfig)
	keySame := false
	if fi, err := os.Stat(in.at(installedKey(role))); err == nil {
		keySame = os.SameFile(fi, key.info)
	}
	keyLine := keyCopyLine(role, dc.key)
	if keySame {
		keyLine = oldKeyLine // a reinstall from the installed files
	}

	conf, err := renderConfig(role, source, dc.raw, keyLine)
	if err != nil {
		return nil, err
	}
	text, err := unit.Render(unit.Spec{Role: role, Exec: bin, Config: installedConfig(role), BindLowPort: low})
	if err != nil {
		return nil, err
	}
	p := &installPlan{}
	if !keySame {
		p.changes = append(p.changes, change{path: installedKey(role), data: key.data, mode: 0o600,
			note: "a copy of " + dc.key})
	}
	p.changes = append(p.changes,
		change{path: installedConfig(role), data: conf, mode: 0o600,
			note: fmt.Sprintf("from %s, key = %q", source, installedKey(role))},
		change{path: installedUnit(role), data: text, mode: 0o644,
			note: fmt.Sprintf("ExecStart=%s %s --config %s", bin, role, installedConfig(role))},
		// What `systemctl enable` makes for WantedBy=multi-user.target.
		change{path: wantsLink(role), link: installedUnit(role), note: "enabled: WantedBy=multi-user.target"},
	)

	// Nothing that install did not write is replaced unasked.
	p.states = make([]state, len(p.changes))
	var foreign []string
	for i, ch := range p.changes {
		ours := unit.Ours
		if ch.path == installedKey(role) {
			ours = func([]byte) bool { return oldKeyLine != "" }
		}
		if p.states[i], err = stateOf(in.at(ch.path), ch, ours); err != nil {
			return nil, err
		}
		if p.states[i].exists && !p.states[i].ours {
			foreign = append(foreign, in.at(ch.path))
		}
	}
	if len(foreign) > 0 && !in.force {
		return nil, fmt.Errorf("not written by mpvpn install, so not replaced: %s (move it away, or give --force)", strings.Join(foreign, ", "))
	}

	switch {
	case key.mode&0o077 != 0 && keySame:
		p.notes = append(p.notes, fmt.Sprintf("warning: %s is %s (mode %04o): chmod 600 it", dc.key, keyModeWarning(key.mode), key.mode))
	case key.mode&0o077 != 0:
		p.notes = append(p.notes, fmt.Sprintf("note: %s is %s (mode %04o); its copy is 0600 anyway: chmod 600 or delete the original", dc.key, keyModeWarning(key.mode), key.mode))
	}
	if keySame {
		p.notes = append(p.notes, fmt.Sprintf("kept %s: the configuration's own key, left as it is", in.at(installedKey(role))))
	}
	return p, nil
}

// apply writes the plan, and on a failure puts back what it wrote.
func (in *installer) apply(p *installPlan) (changed bool, err error) {
	var undo rollback
	err = func() error {
		if err := mkdirs(in.at(etcDir), 0o700, &undo); err != nil {
			return err
		}
		for i, ch := range p.changes {
			if p.states[i].same {
				in.say("unchanged %s", in.at(ch.path))
				continue
			}
			if err := mkdirs(filepath.Dir(in.at(ch.path)), 0o755, &undo); err != nil {
				return err
			}
			if err := put(in.at(ch.path), ch, &undo); err != nil {
				return err
			}
			changed = true
			verb := "wrote"
			if p.states[i].exists && !p.states[i].ours {
				verb = "replaced (--force)"
			}
			in.say("%s %s (%s)", verb, in.at(ch.path), ch.note)
		}
		return nil
	}()
	if err != nil {
		if rerr := undo.run(); rerr != nil {
			return false, fmt.Errorf("%w; putting back what was there failed too: %w", err, rerr)
		}
		return false, fmt.Errorf("%w (nothing changed)", err)
	}
	return changed, nil
}

// checkEtcDir refuses an /etc/mpvpn that others could write to: they could
// swap the configuration or the key under the service.
func (in *installer) checkEtcDir() error {
	fi, err := os.Stat(in.at(etcDir))
	if err != nil {
		return nil // made 0700 when written
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s: not a directory", in.at(etcDir))
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %04o), who could swap the configuration: chmod 700 it", in.at(etcDir), fi.Mode().Perm())
	}
	return nil
}

// start has systemd load the unit and run it: restarted when anything
// changed, so that a reinstall takes effect, and only started (a no-op when
// it runs) when nothing did.
func (in *installer) start(ctx context.Context, role string, changed bool) error {
	name := unit.Name(role)
	if !in.live {
		if in.tree {
			in.say("%s is enabled in %s; the running system was not touched", name, in.root)
		} else {
			in.say("systemd does not run here: %s starts when it does (multi-user.target)", name)
		}
		return nil
	}
	// The wants symlink is the enablement; daemon-reload has systemd
	// read it and the unit.
	verb := "start"
	if changed {
		if err := in.systemctl(ctx, "daemon-reload"); err != nil {
			return err
		}
		verb = "restart"
	}
	if err := in.systemctl(ctx, verb, name); err != nil {
		return fmt.Errorf("%w (installed; see journalctl -u %s)", err, name)
	}
	in.say("%s is running: systemctl status %s, journalctl -u %s", name, name, name)
	return nil
}
