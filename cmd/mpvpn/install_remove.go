//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/mpvpn/mpvpn/internal/unit"
)

// uninstall removes exactly what install wrote: the unit and its
// enablement, the configuration and the key copy. Anything else at those
// paths (a file without install's header, a key the configuration named
// there itself) is left, and named.
func (in *installer) uninstall(ctx context.Context, role string) error {
	unitText, unitErr := os.ReadFile(in.at(installedUnit(role)))
	unitThere := !errors.Is(unitErr, fs.ErrNotExist)
	unitOurs := unitErr == nil && unit.Ours(unitText)
	conf, confErr := os.ReadFile(in.at(installedConfig(role)))
	confOurs := confErr == nil && unit.Ours(conf)

	type item struct {
		path string
		ours bool
	}
	var items []item
	// The enablement goes with the unit it enables; a foreign unit's
	// symlink is its owner's.
	if target, err := os.Readlink(in.at(wantsLink(role))); err == nil {
		items = append(items, item{wantsLink(role), target == installedUnit(role) && (unitOurs || !unitThere)})
	} else if _, err := os.Lstat(in.at(wantsLink(role))); err == nil {
		items = append(items, item{wantsLink(role), false})
	}
	if unitThere {
		items = append(items, item{installedUnit(role), unitOurs})
	}
	if !errors.Is(confErr, fs.ErrNotExist) {
		items = append(items, item{installedConfig(role), confOurs})
	}
	if _, err := os.Lstat(in.at(installedKey(role))); err == nil {
		items = append(items, item{installedKey(role), copiedKeyLine(conf) != ""})
	}
	if len(items) == 0 {
		in.say("%s is not installed%s: nothing to remove", unit.Name(role), in.where())
		return nil
	}

	// Stop and disable it first, so it does not run on without files.
	if unitOurs {
		if err := in.systemctl(ctx, "disable", "--now", unit.Name(role)); err != nil {
			return err
		}
	}
	removed := false
	for _, it := range items {
		if !it.ours {
			in.say("left %s: not written by mpvpn install", in.at(it.path))
			continue
		}
		if err := os.Remove(in.at(it.path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("uninstall %s: %w", role, err)
		}
		in.say("removed %s", in.at(it.path))
		removed = true
	}
	if !removed {
		return nil
	}
	if err := in.removeEtcDirIfEmpty(); err != nil {
		return err
	}
	if unitOurs {
		return in.systemctl(ctx, "daemon-reload")
	}
	return nil
}

func (in *installer) removeEtcDirIfEmpty() error {
	dir := in.at(etcDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		names := make([]string, len(ents))
		for i, e := range ents {
			names[i] = e.Name()
		}
		in.say("left %s: not empty (%s)", dir, strings.Join(names, ", "))
		return nil
	}
	if err := os.Remove(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	in.say("removed %s (empty)", dir)
	return nil
}
