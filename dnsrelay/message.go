//go:build linux

// Package dnsrelay carries DNS between the applications on a client and
// the concentrator's resolver, both ends.
//
// On the client, a Forwarder answers the queries that applications send
// to mpvpn's resolver addresses (UDP datagrams from the netstack, and DNS
// over TCP streams) by sending them through the tunnel: all of them over
// one long-lived tunnel flow to the concentrator's resolver service,
// spoken as DNS over TCP (RFC 1035 4.2.2 framing, pipelined and answered
// out of order as RFC 7766 allows), so that a lookup costs one round trip
// to the concentrator once the flow is open, and no query leaves an
// uplink in clear text. On the concentrator, ServeStream reads that
// stream and resolves each query with its upstream resolver (UDP, and TCP
// when the answer is truncated).
//
// Queries are forwarded as they are: the package reads their header, the
// question and the EDNS(0) UDP size, nothing else; it is no cache and no
// validator. A query that gets no answer in time is answered SERVFAIL, so
// an application's lookup fails quickly rather than hanging.
package dnsrelay

import (
	"encoding/binary"
	"errors"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	headerSize = 12
	// MaxMessage is the largest DNS message: DNS over TCP's 2-byte length.
	MaxMessage = 65535
	// minUDPSize is the answer size every DNS client over UDP accepts
	// (RFC 1035 2.3.4), when its query has no EDNS(0) record.
	minUDPSize = 512
)

var errMalformed = errors.New("dnsrelay: malformed DNS message")

// id is a message's ID; m must be at least a header long.
func id(m []byte) uint16 { return binary.BigEndian.Uint16(m) }

func setID(m []byte, v uint16) { binary.BigEndian.PutUint16(m, v) }

// isQuery: a header long and the QR bit clear.
func isQuery(m []byte) bool { return len(m) >= headerSize && m[2]&0x80 == 0 }

// isResponse: a header long and the QR bit set.
func isResponse(m []byte) bool { return len(m) >= headerSize && m[2]&0x80 != 0 }

// truncated: the TC bit of a response.
func truncated(m []byte) bool { return len(m) >= headerSize && m[2]&0x02 != 0 }

// udpSize is how large an answer over UDP the query's sender accepts: its
// EDNS(0) payload size (never less than 512), or 512 without EDNS(0).
func udpSize(query []byte) int {
	var p dnsmessage.Parser
	if _, err := p.Start(query); err != nil {
		return minUDPSize
	}
	if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
		return minUDPSize
	}
	for {
		h, err := p.AdditionalHeader()
		if err != nil {
			return minUDPSize
		}
		if h.Type == dnsmessage.TypeOPT {
			// An OPT record's class is the sender's UDP payload size.
			return max(int(h.Class), minUDPSize)
		}
		if p.SkipAdditional() != nil {
			return minUDPSize
		}
	}
}

// headerOnly is m's header, as edit leaves it, and m's questions: what
// SERVFAIL and a truncated answer are made of.
func headerOnly(m []byte, edit func(*dnsmessage.Header)) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(m)
	if err != nil {
		return nil, errMalformed
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return nil, errMalformed
	}
	h.Response = true
	edit(&h)
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), h)
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	for _, q := range qs {
		if err := b.Question(q); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// servfail is the SERVFAIL answer to query, or nil when the query cannot
// be parsed (then it gets no answer at all).
func servfail(query []byte) []byte {
	// The query's RD bit stays (RFC 1035 4.1.1); RA is ours to claim:
	// recursion is available, it just failed.
	m, err := headerOnly(query, func(h *dnsmessage.Header) {
		h.RCode = dnsmessage.RCodeServerFailure
		h.RecursionAvailable = true
	})
	if err != nil {
		return nil
	}
	return m
}

// fitUDP returns resp as it may go back over UDP to the sender of query:
// unchanged when it fits the sender's size, otherwise header and question
// with the TC bit set, so the sender retries over TCP (RFC 1035 4.2.1).
func fitUDP(query, resp []byte) []byte {
	if len(resp) <= udpSize(query) {
		return resp
	}
	t, err := headerOnly(resp, func(h *dnsmessage.Header) { h.Truncated = true })
	if err != nil || len(t) > minUDPSize {
		return nil
	}
	return t
}
