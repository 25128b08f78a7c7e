//go:build linux

// Package tunnel is mpvpn's client↔concentrator protocol, both ends: one
// application TCP flow is one kernel MPTCP connection, opened with a Noise
// IK handshake that authenticates the client and names the destination,
// then carried as AEAD frames.
//
// # Handshake
//
// Noise_IK_25519_ChaChaPoly_BLAKE2s (github.com/flynn/noise) with the
// prologue "mpvpn v1". The client knows the concentrator's static key in
// advance; the concentrator learns and checks the client's from msg1.
//
//	msg1, client → server, always 148 bytes:
//	  0   32  e                 ephemeral public key (clear)
//	  32  48  s                 client static key, encrypted (32 + 16 tag)
//	  80  52  payload           encrypted (36 + 16 tag):
//	            0  12  timestamp  TAI64N-like: 2^62 + Unix seconds (8, BE),
//	                              nanoseconds (4, BE)
//	            12  1  protocol   6 (TCP); others reserved
//	            13  1  family     4 or 6
//	            14 16  address    IPv4 in the first 4 bytes, the rest zero;
//	                              IPv4-mapped IPv6 is sent as IPv4
//	            30  2  port       BE, not 0
//	          or, asking for one of the concentrator's own services:
//	            12  1  protocol   0 (service)
//	            13  1  service    1 (resolver: DNS over TCP framing on
//	                              the flow, RFC 1035 4.2.2 / RFC 7766),
//	                              2 (datagrams: UDP, package udprelay)
//	            14 18  zero
//	          or, for a pooled connection (see Pool below):
//	            12  1  protocol   255 (pool)
//	            13  1  soon       0: wait in the pool; 1: the request frame
//	                              follows msg2 at once (a flow that found no
//	                              pooled connection), so this is a flow being
//	                              opened, not counted as pooled
//	            14 18  zero
//	          then, in every msg1:
//	            32  1  offer      transport ciphers offered besides
//	                              ChaCha20-Poly1305: bit 0 AES-256-GCM,
//	                              the other bits zero
//	            33  1  speaks     bit 0: ready frames (see Pool), the
//	                              other bits zero
//	            34  2  zero
//	  132 16  mac1              BLAKE2s-128 keyed with
//	                              BLAKE2s-256("mpvpn v1 mac1" ‖ server public key),
//	                              over bytes 0..131
//
//	msg2, server → client, always 64 bytes, sent only once the server
//	has decided (Flow.Accept / Flow.Refuse; the concentrator dials the
//	destination first):
//	  0   32  e                 ephemeral public key (clear)
//	  32  32  payload           encrypted (16 + 16 tag):
//	            0   1  verdict    Connected=1 Refused=2 Unreachable=3
//	                              TimedOut=4 NotAllowed=5 Limited=6
//	            1   1  cipher     the transport: 0 ChaCha20-Poly1305,
//	                              1 AES-256-GCM (only if offered)
//	            2  14  reserved   zero
//
// msg1 carries no application bytes: it is replayable and, for the
// destination, not forward secret (Noise payload properties 1/2). The
// client sends nothing more until the verdict, and nothing in msg2 or
// after it is of use to whoever replays msg1 without the ephemeral key.
//
// # Pool
//
// A new flow that opens its own connection pays two round trips before
// the app's handshake completes (connect, then msg1 and msg2). The client
// therefore keeps a pool of connections already through the handshake
// (Client.RunPool, ClientConfig.PoolSize, default 24): msg1 names the
// pool, msg2 answers Connected (authenticated, ready) or Limited (over
// the concentrator's MaxPooledPerPeer or MaxPooled), and the connection
// then waits, keyed, with no keepalives. A flow takes one and sends its
// target in the first transport frame; the concentrator dials and
// answers in the first frame back:
//
//	request frame, client → server, always 38 bytes:
//	  0   2  length   36
//	  2  36  ciphertext of 20 bytes: msg1's payload bytes 12..31 (a
//	         destination or a service; never the pool) + 16 tag
//	verdict frame, server → client, always 34 bytes:
//	  0   2  length   32
//	  2  32  ciphertext of msg2's 16-byte payload (its cipher byte
//	         zero: the cipher was agreed in msg2) + 16 tag
//
// after which the stream is ordinary frames. One round trip, as direct
// TCP's own handshake, and the destination travels under the transport
// keys, which are forward secret, rather than in msg1. The dial-first
// rule, the verdicts, the limits and their order are the same as for
// msg1's target; the handshake rate (PeerHandshakeRate) counts each
// pooled connection when it is made. A replayed pool msg1 is refused by
// the replay cache like any msg1, and even a fresh one gets its sender
// nothing without msg1's ephemeral key.
//
// The concentrator closes a pooled connection unused after PoolIdle
// (6 min); the client retires its own earlier (PoolMaxAge, 5 min), keeps
// only two after PoolLinger (10 min) without a new flow, and checks each
// one with a non-blocking MSG_PEEK before use, so one the concentrator
// closed (restart, idle timeout) never carries a flow. One closed between
// that check and the request frame ends in EOF or a reset with no
// verdict, and the flow dials afresh, as a lost SYN is sent again.
//
// A connection whose flow ended cleanly carries the client's next flow
// (reuse.go). If msg1 said the client speaks ready frames, the
// concentrator sends one as soon as it has the client's end-of-stream
// frame, before the next verdict, so that the ACK of that frame goes out
// at once instead of after a delayed ACK's 40 ms (the MPTCP scheduler
// would otherwise put the next request on the other subflow):
//
//	ready frame, server → client, always 18 bytes:
//	  0   2  length   16
//	  2  16  ciphertext of nothing: the tag
//
// A flow that finds the pool empty (or runs without one) opens its own
// connection the same way by default: msg1 names the pool with soon set,
// and the destination follows in a request frame once msg2 has come, one
// round trip later than in msg1. The concentrator counts such a
// connection as a flow being opened (the flow limits, HandshakeDeadline
// for the request), not against MaxPooledPerPeer: a burst of flows larger
// than the pool is not refused for the pool's cap. So no destination is ever in a replayable
// message, and a recorded msg1 replayed to the other concentrators of a
// fleet, which share the keys but not the replay cache, dials nothing on
// any of them. ClientConfig.EarlyDestination puts it back in msg1 for
// whoever prefers the round trip.
//
// # Server checks, cheapest first
//
//  1. exactly 148 bytes read, or 144 whose mac1 is valid (a client from
//     before the cipher offer, taken as offering ChaCha20-Poly1305 only),
//     mac1 valid (one BLAKE2s; no DH for anyone
//     who does not know the server's public key);
//  2. Noise decryption (es, ss) and the client's static key among the
//     configured peers;
//  3. the payload well formed;
//  4. the timestamp after the server's horizon (its start plus
//     FutureSkew), at most FutureSkew (1 s) ahead of the server's clock
//     and at most ReplayWindow (30 s) behind it. Clients stamp in the
//     server's clock, learned from the probe replies (which also carry
//     the horizon), so their own clock may be off; the horizon means no
//     message accepted before a restart is accepted after it;
//  5. the ephemeral key not seen before, in the peer's own replay cache:
//     an exact map with expiry at timestamp+ReplayWindow and a cap per
//     peer. Parallel flows arrive out of order over different paths, so
//     there is no "increasing timestamp per peer" rule as in WireGuard;
//     a cache per peer means a peer's flood refuses only that peer.
//
// The server's clock (Server.Now) is its wall clock at start advanced by
// the monotonic clock, so the window and the cache's expiry never step.
//
// A connection that fails any check, or sends less than msg1, gets no
// byte back. The server reads exactly msg1's size (or less, if less
// comes), nothing more, and closes with a RST (SO_LINGER 0) at
// HandshakeDeadline after accept, whatever was sent and whenever the peer
// stopped, so a prober learns neither how many bytes were consumed nor
// which check failed.
//
// Unauthenticated connections live in a table (MaxHalfOpen in all,
// MaxHalfOpenPerAddr per IPv4 address or IPv6 /64, MaxHalfOpenPerSite per
// IPv6 /48). A newcomer is never refused: when its source's share or the
// table is full, the oldest unauthenticated connection of that share (or
// of all) is closed at once instead. A legitimate client authenticates
// within a fraction of a round trip, a flood's connections linger, so a
// flood pushes out only its own (see halfOpen in admission.go).
//
// An authenticated flow then meets three limits, each answered with the
// verdict Limited: the peer's rate of new flows (PeerHandshakeRate, a
// token bucket), the server's flows in all (MaxFlows), the peer's flows
// (MaxFlowsPerPeer). The peer's limits never refuse another peer.
//
// # Transport
//
// After msg2 both sides hold the CipherStates from Split (the initiator
// sends with the first), for the cipher msg2 named: ChaCha20-Poly1305
// with Split's keys as they are (Noise's own transport), or AES-256-GCM
// with keys derived from them (keyed BLAKE2s-256 of "mpvpn v1 transport
// aes-256-gcm"; Noise's AESGCM nonce). The client offers AES-256-GCM
// when ClientConfig.Cipher allows it (by default: this CPU has AES
// instructions, HardwareAES), and the concentrator takes the offer when
// ServerConfig.Cipher does (the same default), so AES is used only where
// both ends run it in hardware. Both the offer and the choice are inside
// the handshake's AEAD payloads and its hash: no one on the path can
// change either, and a client refuses a choice it did not offer. The
// stream is a sequence of frames:
//
//	length  2 bytes, big-endian: the ciphertext length, 16..32766
//	ciphertext  the AEAD (nonce = frame counter, no AD):
//	            up to 32750 bytes of plaintext + 16 tag
//
// A frame is at most 32 KiB on the wire. That is faster than 64 KiB (see
// conn.go), and it bounds what a frame stopped half-way can pin on the
// receiver: a reader that has to wait in the middle of a frame keeps it
// in a buffer of one frame's size, for at most the frame timeout
// (DefaultFrameTimeout, 90 s), after which the flow is closed with
// ErrFrameTimeout. An idle flow holds no buffer at all, on either side.
//
// An empty plaintext (a 16-byte frame) is the end-of-stream marker that
// CloseWrite sends before shutdown(SHUT_WR); the peer's Read then returns
// io.EOF. A length under 16, a failed tag (bit flip, truncation,
// duplicate, reorder, injection), data after the end-of-stream frame, the
// TCP stream ending without that frame, or an exhausted nonce
// (noise.ErrMaxNonce; there is no rekey) closes the flow; no byte of a
// bad frame reaches the reader. A length over the maximum is refused on
// the header alone; buffers have a fixed size, never one a peer chose.
//
// # Sockets
//
// The client dials with Dialer.SetMultipathTCP(true), SO_MARK (Mark) and
// TCP_FASTOPEN_CONNECT (FastOpen) set in Control, and TCP keepalive. Go's
// dialMPTCP retries with plain TCP after any error of the MPTCP attempt
// (Go 1.26), so a refused or unreachable concentrator is dialled twice
// and the second attempt's error, the same errno, is what DialTCP wraps.
// With Fast Open, DialContext may return before any packet left and
// connect errors show up on the handshake's Write or Read instead. After
// the handshake, (*net.TCPConn).MultipathTCP tells whether the connection
// really is MPTCP; a plain TCP fallback works, is logged at Warn (at most
// once a minute) and counted in ClientStats.Fallbacks.
//
// Listen opens an MPTCP listener (Fast Open queue 256 when asked).
// Fast Open also needs net.ipv4.tcp_fastopen bit 0x1 on clients and 0x2
// on the server; the caller sets it, and NewClient logs when bit 0x1 is
// missing. mpvpn's server leaves Fast Open off by default: see
// test/netns/cmd/mptcp-tfo-stall for the kernel bug that makes it unsafe
// with more than one subflow (Linux 6.18, 2026-11).
package tunnel
