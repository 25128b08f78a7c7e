//go:build linux

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
// # Backing off while idle
//
// With ProberConfig.Busy saying no flow is open, a path is probed every
// IdleInterval (2 s) instead, and judged dead after three of them: a
// twentieth of the traffic on an idle metered uplink, and a dark uplink
// is still withdrawn before the next flow, so that it does not start on
// it. The moment Busy turns true (checked every 50 ms) every path probes
// at once and goes back to Interval; its silence is counted from then, so
// a reply from an idle interval ago neither kills nor saves it.
//
// # Wire format (UDP, to the concentrator's TCP listener port number)
//
//	request, client → server, 40 bytes:
//	  0   8  id   BLAKE2s-256(key=K, "id" ‖ epoch)[:8]; epoch is the
//	              timestamp >> 38 (about 275 s)
//	  8  16  C    P XOR BLAKE2s-256(key=Kreq-enc, T)[:16], where the
//	              plaintext P = timestamp (sender's Unix ns)
//	              ‖ counter (per client, never repeats)
//	  24 16  T    BLAKE2s-128(key=Kreq-mac, id ‖ P)
//
//	reply, server → client, 40 bytes (never more than the request):
//	  0  24  C    P XOR BLAKE2s-256(key=Krep-enc, T)[:24], where
//	              P = counter (the request's, echoed)
//	              ‖ server (the server's Unix ns when it answered)
//	              ‖ horizon (the server's replay horizon, Unix ns; 0: none)
//	  24 16  T    BLAKE2s-128(key=Krep-mac, P)
//
// Every integer is 8 bytes, big-endian. Version 1 (41 bytes, with a type
// byte) and version 2 do not interoperate: a v2 responder counts v1
// requests as malformed, so both ends are upgraded together.
//
// K = BLAKE2s-256(key=X25519(own private, other public), "mpvpn probe v2"
// ‖ client public ‖ server public), computed by both ends from the same
// static keys the tunnel uses, and each of the four keys is
// BLAKE2s-256(key=K, label) with its own label: "request mac", "request
// encryption", "reply mac", "reply encryption". Keyed BLAKE2s is a PRF, so
// this is HKDF's extract and expand steps without the HMAC wrapping.
// Requests and replies have the same size and no type byte: their keys
// keep them apart, so neither can be taken for the other.
//
// # Why the fields are encrypted
//
// Version 1 sent the timestamp and the counter in clear. The counter
// starts at the client's clock and goes up by one per probe, so two
// captures of one device, on two networks minutes or hours apart, showed
// the same line, start + n, and linked the device whatever its id did;
// the timestamp told the client's clock offset, which is nearly as
// personal. Now nothing in a probe is stable or predictable across epochs
// for an observer without the keys: the id is a keyed hash that changes
// every epoch, and C and T look random.
//
// C and T are a deterministic authenticated encryption in the manner of
// SIV (RFC 5297): the tag T, a MAC of everything, is also the nonce from
// which the key stream is derived. A datagram of 40 bytes has no room for
// a separate nonce, and needs none: no plaintext is ever sealed twice
// (each request has a new counter; a reply is sealed only for a request
// that passed the replay window, and the server's clock in it differs
// even when a restarted server answers a counter again), so each T is new
// and unpredictable, and so is the key stream. The receiver derives the
// key stream from T, decrypts, and recomputes T; only a match
// authenticates the datagram, and only then is any field used.
//
// Nothing secret or identifying is sent in clear: the client's public key
// never is, and the id lets a passive observer follow one device for no
// longer than an epoch (within one it does link the uplinks of one
// client; so do the MPTCP tokens of its connections). The id also lets
// the server find the peer with one map lookup instead of trying every
// key.
//
// # The server's clock
//
// Clients stamp their tunnel handshakes in the concentrator's clock,
// which the replies carry, with the replay horizon (the time before which
// the concentrator refuses every handshake stamp, which moves when it
// restarts). Prober.ServerNow turns them into a lower bound of the
// server's clock: a reply left the server at the time it carries and
// arrived after, so that time plus how long ago it arrived, on this
// host's monotonic clock, is never ahead.
//
// # What the server answers
//
// Like the tunnel, the responder is silent to anyone who does not
// authenticate: a request that is not 40 bytes, has an unknown id, a bad
// tag, a timestamp more than ±60 s (MaxSkew) from the server's clock or outside its
// id's epoch, or a counter it has already seen gets no reply, costs no
// allocation, and creates no state. The checks run cheapest first: only
// the id is in clear, so the timestamp is checked once the request is
// decrypted and authenticated, and the replay window is only touched
// after that, so forged packets cannot move it. The counter check is a
// sliding bitmap per client (RFC 6479, as WireGuard's data counters),
// 4032 counters wide: probes of several uplinks arrive out of order, so
// "greater than the last one" would refuse good probes; 4032 is 40 s of
// reordering for 10 uplinks at the default 100 ms. The timestamp bounds
// how long a captured request can be replayed after a server restart has
// emptied the windows.
//
// Answers are rate-bounded per client (default 200/s, burst 100: ten
// uplinks probing every 50 ms) and in total (default 50 000/s), so a
// client key, even a stolen one, can make the server send at most that
// many 40-byte datagrams to a spoofed address: a reflection without
// amplification, and a bounded one.
//
// # Counter
//
// The counter starts at the client's Unix time in nanoseconds when the
// Prober is created and increases by one per request, across all paths, so
// it stays unique across client restarts without any stored state (at 10
// requests per second it never catches up with the clock). It is
// encrypted, so its trajectory tells an observer nothing. If the client
// restarts after its clock was stepped back, its new counters can be below
// the server's window for as long as the step (at most 60 s, beyond which
// the timestamp check refuses it anyway). Two processes sharing one client
// key lock each other out: one key per client.
package probe
