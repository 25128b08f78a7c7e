//go:build linux

package tunnel

import (
	"net/netip"
	"sync"
)

// halfOpen is the table of connections that have not authenticated yet.
// It never refuses a newcomer: when a source is over its share, or the
// table is full, it evicts the oldest unauthenticated connection of that
// source (or of all) instead.
//
// Why evict the oldest: a legitimate client sends msg1 in the same flight
// as the ACK that completes its TCP handshake, so it is unauthenticated
// for well under a round trip, while a slowloris or a garbage sender sits
// here until the handshake deadline. Refusing newcomers once the table is
// full (what mpvpn did until issue 8) let four addresses reconnecting
// ~820 times a second hold every slot and lock every client out; evicting
// the oldest means a flood only pushes its own connections out, and a real
// one is evicted only if the flood replaces the whole table (or its
// source's share) within that fraction of a round trip.
//
// Shares: an IPv4 address, or an IPv6 /64 (one host usually owns a whole
// /64), may hold perAddr slots; an IPv6 /48 (one site) perSite. They are
// enforced only under load, once the table is half full, as WireGuard asks
// for cookies only under load: until then a burst from one address (a
// page load, or many clients behind one CGNAT address) takes what it
// needs. Under load, with the defaults (4096 in all, 32 per address, 256
// per /48), a flood holds at most 32 slots per address, so it takes 128
// addresses, or 16 /48s, to fill the table at all; beyond that the oldest
// of all goes.
//
// Which check a connection failed plays no part: a connection that sent
// garbage and one still waiting for its bytes are both unauthenticated and
// evicted by age alone, so eviction tells a prober how full the table is,
// never what the server thought of its bytes.
//
// One exception to "oldest first": a connection whose whole first message
// is already in its socket's receive queue has done its part and is only
// waiting for the server to get to it. It is passed over (up to
// readyScan of them per eviction), so that a burst of legitimate flows
// that arrives faster than the server reads them (a page load, 200 flows
// at once from behind one address) does not evict itself. A share may
// then run over its limit until the server catches up, but never the
// table over twice its size: past that the oldest goes, ready or not.
type halfOpen struct {
	mu      sync.Mutex
	max     int
	perAddr int
	perSite int
	all     hoList
	groups  map[netip.Prefix]*hoList
}

// The lists an entry is on: all entries, its address's, its /48's.
const (
	hoAll = iota
	hoAddr
	hoSite
	hoLists
)

type hoEntry struct {
	links [hoLists]struct{ prev, next *hoEntry }
	keys  [hoLists]netip.Prefix // hoAddr, hoSite; invalid: not on that list
	// evict closes the connection early; called without the table's lock.
	evict func()
	// ready reports whether the whole first message is waiting in the
	// connection's receive queue (nil: never); called with the lock held,
	// so it must be quick (one ioctl).
	ready func() bool
	// checking: msg1 is complete and being verified. Such an entry is
	// not evicted, so a legitimate client is never cut off between its
	// last byte and its verdict; it counts until released.
	checking bool
	gone     bool
}

// hoList is an intrusive doubly linked list, oldest at head, threaded
// through one of hoEntry.links.
type hoList struct {
	which      int
	head, tail *hoEntry
	n          int
}

func (l *hoList) push(e *hoEntry) {
	lk := &e.links[l.which]
	lk.prev, lk.next = l.tail, nil
	if l.tail != nil {
		l.tail.links[l.which].next = e
	} else {
		l.head = e
	}
	l.tail = e
	l.n++
}

func (l *hoList) remove(e *hoEntry) {
	lk := &e.links[l.which]
	if lk.prev != nil {
		lk.prev.links[l.which].next = lk.next
	} else {
		l.head = lk.next
	}
	if lk.next != nil {
		lk.next.links[l.which].prev = lk.prev
	} else {
		l.tail = lk.prev
	}
	lk.prev, lk.next = nil, nil
	l.n--
}

// readyScan bounds how many ready entries one eviction passes over.
const readyScan = 8

// victim returns the oldest entry that may be evicted, or nil: not one
// being checked, nor (unless force) one whose first message is ready.
func (l *hoList) victim(force bool) *hoEntry {
	skipped := 0
	for e := l.head; e != nil; e = e.links[l.which].next {
		if e.checking {
			continue
		}
		if !force && e.ready != nil && e.ready() {
			if skipped++; skipped >= readyScan {
				return nil
			}
			continue
		}
		return e
	}
	return nil
}

func newHalfOpen(max, perAddr, perSite int) *halfOpen {
	return &halfOpen{
		max:     max,
		perAddr: perAddr,
		perSite: perSite,
		all:     hoList{which: hoAll},
		groups:  make(map[netip.Prefix]*hoList),
	}
}

// shareKeys returns the prefixes a source address is counted under: its
// IPv4 address or IPv6 /64, and for IPv6 its /48. An invalid address
// (not IP: tests over pipes) shares one key.
func shareKeys(a netip.Addr) (addr, site netip.Prefix) {
	a = a.Unmap().WithZone("")
	switch {
	case a.Is4():
		return netip.PrefixFrom(a, 32), netip.Prefix{}
	case a.Is6():
		p64, _ := a.Prefix(64)
		p48, _ := a.Prefix(48)
		return p64, p48
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0), netip.Prefix{}
}

// admit adds a connection from src and returns its entry, making room
// first: the oldest of its address's share if that is full, of its /48's
// if that is full, of the whole table if that is full. It returns how
// many were evicted; their evict functions have been called.
func (h *halfOpen) admit(src netip.Addr, evict func(), ready func() bool) (*hoEntry, int) {
	e := &hoEntry{evict: evict, ready: ready}
	e.keys[hoAddr], e.keys[hoSite] = shareKeys(src)
	var victims []*hoEntry
	h.mu.Lock()
	underLoad := 2*h.all.n >= h.max
	for i, limit := range [hoLists]int{hoAll: h.max, hoAddr: h.perAddr, hoSite: h.perSite} {
		l := &h.all
		if i != hoAll {
			if !e.keys[i].IsValid() || !underLoad {
				continue
			}
			l = h.groups[e.keys[i]]
			if l == nil {
				l = &hoList{which: i}
				h.groups[e.keys[i]] = l
			}
		}
		for l.n >= limit {
			v := l.victim(i == hoAll && l.n >= 2*limit)
			if v == nil {
				// Everything evictable is being checked or ready: over
				// its share until the server catches up.
				break
			}
			h.removeLocked(v)
			victims = append(victims, v)
		}
	}
	h.all.push(e)
	for i := hoAddr; i < hoLists; i++ {
		if !e.keys[i].IsValid() {
			continue
		}
		// Looked up again: evicting the last of a group deleted it.
		l := h.groups[e.keys[i]]
		if l == nil {
			l = &hoList{which: i}
			h.groups[e.keys[i]] = l
		}
		l.push(e)
	}
	h.mu.Unlock()
	for _, v := range victims {
		v.evict()
	}
	return e, len(victims)
}

func (h *halfOpen) removeLocked(e *hoEntry) {
	e.gone = true
	h.all.remove(e)
	for i := hoAddr; i < hoLists; i++ {
		if !e.keys[i].IsValid() {
			continue
		}
		l := h.groups[e.keys[i]]
		l.remove(e)
		if l.n == 0 {
			delete(h.groups, e.keys[i])
		}
	}
}

// check marks e as being verified (not evictable). It reports false if e
// was evicted already.
func (h *halfOpen) check(e *hoEntry) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e.gone {
		return false
	}
	e.checking = true
	return true
}

// uncheck makes e evictable again (its check failed: it waits for the
// deadline like any other unauthenticated connection).
func (h *halfOpen) uncheck(e *hoEntry) {
	h.mu.Lock()
	e.checking = false
	h.mu.Unlock()
}

// release removes e, if it is still in the table.
func (h *halfOpen) release(e *hoEntry) {
	h.mu.Lock()
	if !e.gone {
		h.removeLocked(e)
	}
	h.mu.Unlock()
}

func (h *halfOpen) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.all.n
}
