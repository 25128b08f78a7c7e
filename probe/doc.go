// Package probe tells, per uplink, whether the concentrator can be reached
// through it right now, fast enough to matter: a path that goes silent is
// reported dead within about half a second, and a path that comes back is
// reported alive again within about half a second (issue 4, "carrier up,
// nothing gets through").
//
// # Why a separate probe, and not the tunnel's own TCP connections
//
// The kernel already notices a silent subflow, but only through TCP's
// retransmission timer, whose exponential backoff is exactly what we are
// trying to beat: after a 20 s outage kernel MPTCP alone took about 8 s to
// use the uplink again (DESIGN.md). An idle uplink carries no TCP at all,
// so nothing would notice its death or its return. A small UDP datagram
// every Interval, with no retransmission and no backoff, measures the path
// itself at a fixed cadence, whatever the flows on it are doing.
//
// # Wire format (UDP, to the concentrator's TCP listener port number)
//
//	request, client → server, 41 bytes:
//	  0   1  type       0x01
//	  1   8  id         BLAKE2s-256(key=K, "id" ‖ epoch)[:8]; epoch is
//	                    the timestamp >> 38 (about 275 s)
//	  9   8  timestamp  sender's Unix nanoseconds (BE)
//	  17  8  counter    per client, never repeats (BE)
//	  25 16  mac        BLAKE2s-128(key=Kmac, bytes 0..24)
//
//	reply, server → client, 41 bytes (never more than the request):
//	  0   1  type       0x02 (so a reply is never taken for a request)
//	  1   8  counter    echoed
//	  9   8  timestamp  echoed
//	  17  8  server     the server's Unix nanoseconds when it answered
//	  25 16  mac        BLAKE2s-128(key=Kmac, bytes 0..24)
//
// K = BLAKE2s-256(key=X25519(own private, other public), "mpvpn probe v1"
// ‖ client public ‖ server public), computed by both ends from the same
// static keys the tunnel uses, and Kmac = BLAKE2s-256(key=K, "mac"). Keyed
// BLAKE2s is a PRF, so this is the extract step of HKDF without the HMAC
// wrapping. Nothing secret or identifying is sent in clear: the client's
// public key never is, and the id is a keyed hash that changes every epoch,
// so a passive observer cannot follow one device across networks for
// longer than a few minutes through its probes (the id is still constant
// within an epoch, so it does link the uplinks of one client while it
// lasts; so do the MPTCP tokens of its connections). The id also lets the
// server find the peer with one map lookup instead of trying every key.
//
// # What the server answers
//
// Like the tunnel, the responder is silent to anyone who does not
// authenticate: a request that is not 41 bytes, has the wrong type, a
// timestamp more than ±30 s from the server's clock, an unknown id, a bad
// MAC, or a counter it has already seen gets no reply, costs no
// allocation, and creates no state. The checks run cheapest first, and the
// replay window is only touched after the MAC has been verified, so forged
// packets cannot move it. The counter check is a sliding bitmap per client
// (RFC 6479, as WireGuard's data counters), 4032 counters wide: probes of
// several uplinks arrive out of order, so "greater than the last one" would
// refuse good probes; 4032 is 40 s of reordering for 10 uplinks at the
// default 100 ms. The timestamp bounds how long a captured request can be
// replayed after a server restart has emptied the windows.
//
// Answers are rate-bounded per client (default 100/s, burst 50: ten
// uplinks at the default interval) and in total (default 50 000/s), so a
// client key, even a stolen one, can make the server send at most that
// many 41-byte datagrams to a spoofed address: a reflection without
// amplification, and a bounded one.
//
// # Counter
//
// The counter starts at the client's Unix time in nanoseconds when the
// Prober is created and increases by one per request, across all paths, so
// it stays unique across client restarts without any stored state (at 10
// requests per second it never catches up with the clock). If the client
// restarts after its clock was stepped back, its new counters can be below
// the server's window for as long as the step (at most 30 s, beyond which
// the timestamp check refuses it anyway). Two processes sharing one client
// key lock each other out: one key per client.
package probe
