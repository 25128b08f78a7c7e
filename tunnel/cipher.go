//go:build linux

package tunnel

import (
	"fmt"
	"runtime"

	"github.com/flynn/noise"
	"golang.org/x/crypto/blake2s"
	"golang.org/x/sys/cpu"
)

// Cipher is the AEAD that seals a connection's transport frames. The
// handshake itself is always Noise_IK_25519_ChaChaPoly_BLAKE2s; only what
// follows msg2 uses the Cipher the two ends agreed on in it.
//
// Why two: ChaCha20-Poly1305 is fast everywhere and constant-time without
// special instructions, which is why WireGuard has nothing else. But a
// concentrator's CPU is the limit of its throughput (README, "unshaped"),
// and on a CPU with AES and carry-less multiply instructions AES-256-GCM
// takes half the time (Go 1.26.8 on this project's 2-core VM, 2026-12-02,
// BenchmarkFrame: sealing and opening a 16 KiB frame 11.5 µs against
// 22.5 µs, 1.43 against 0.73 GB/s). TLS 1.3 clients make the same choice
// for the same reason (Go's crypto/tls prefers AES-GCM only when both
// ends have the instructions).
type Cipher uint8

const (
	ChaCha20Poly1305 Cipher = 0
	AES256GCM        Cipher = 1
)

func (c Cipher) String() string {
	switch c {
	case ChaCha20Poly1305:
		return "chacha20-poly1305"
	case AES256GCM:
		return "aes-256-gcm"
	}
	return fmt.Sprintf("cipher(%d)", uint8(c))
}

func (c Cipher) valid() bool { return c == ChaCha20Poly1305 || c == AES256GCM }

// CipherPolicy is one end's setting (`--cipher`).
type CipherPolicy uint8

const (
	// CipherAuto: AES-256-GCM when this host has AES instructions
	// (HardwareAES) and the other end agrees, else ChaCha20-Poly1305.
	CipherAuto CipherPolicy = iota
	// CipherChaCha: ChaCha20-Poly1305 always (a client offers nothing
	// else, a concentrator accepts nothing else).
	CipherChaCha
	// CipherAES: AES-256-GCM whenever the other end agrees, hardware or
	// not (a client offers it, a concentrator takes it when offered).
	CipherAES
)

// ParseCipherPolicy reads a `--cipher` value.
func ParseCipherPolicy(s string) (CipherPolicy, error) {
	switch s {
	case "", "auto":
		return CipherAuto, nil
	case "chacha20-poly1305":
		return CipherChaCha, nil
	case "aes-256-gcm":
		return CipherAES, nil
	}
	return 0, fmt.Errorf("unknown cipher %q (want auto, chacha20-poly1305 or aes-256-gcm)", s)
}

func (p CipherPolicy) String() string {
	switch p {
	case CipherAuto:
		return "auto"
	case CipherChaCha:
		return "chacha20-poly1305"
	case CipherAES:
		return "aes-256-gcm"
	}
	return fmt.Sprintf("policy(%d)", uint8(p))
}

// CiphersOf names the transport ciphers an end uses, preferred first:
// with AES-256-GCM offered (client) or taken (server), or without.
func CiphersOf(aes bool) []string {
	if aes {
		return []string{AES256GCM.String(), ChaCha20Poly1305.String()}
	}
	return []string{ChaCha20Poly1305.String()}
}

// wantsAES: with this policy, on a host with (hw) or without AES
// instructions, an end offers (client) or accepts (concentrator)
// AES-256-GCM.
func (p CipherPolicy) wantsAES(hw bool) bool {
	return p == CipherAES || (p == CipherAuto && hw)
}

// HardwareAES reports whether Go's AES-GCM runs on this CPU's
// instructions (constant-time and fast) rather than its portable code.
// The conditions are crypto/internal/fips140/aes/gcm's (Go 1.26.8, read
// 2026-12-02): AES-NI, PCLMULQDQ, SSE4.1 and SSSE3 on amd64, AES and
// PMULL on arm64, the CPACF functions on s390x, and POWER8's crypto on
// ppc64/ppc64le (which Go requires anyway).
func HardwareAES() bool {
	switch runtime.GOARCH {
	case "amd64":
		return cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ && cpu.X86.HasSSE41 && cpu.X86.HasSSSE3
	case "arm64":
		return cpu.ARM64.HasAES && cpu.ARM64.HasPMULL
	case "s390x":
		return cpu.S390X.HasAES && cpu.S390X.HasAESCTR && cpu.S390X.HasGHASH
	case "ppc64", "ppc64le":
		return true
	}
	return false
}

// negotiate is the concentrator's choice for a client that offered (or
// did not offer) AES-256-GCM, when it accepts (or does not) such offers:
// AES only if both want it.
func negotiate(offered, accept bool) Cipher {
	if offered && accept {
		return AES256GCM
	}
	return ChaCha20Poly1305
}

// transportKeys are a connection's from msg2 on: Split's CipherStates
// for the agreed Cipher.
type transportKeys struct {
	send, recv *noise.CipherState
	cipher     Cipher
}

func newTransportKeys(c Cipher, send, recv *noise.CipherState) transportKeys {
	return transportKeys{send: transport(c, send), recv: transport(c, recv), cipher: c}
}

var aesSuite = noise.NewCipherSuite(noise.DH25519, noise.CipherAESGCM, noise.HashBLAKE2s)

// aesKeyLabel separates the AES-256-GCM transport key from the key Split
// gave: no key is ever used with two algorithms, even when the two ends
// disagree on which one to use (they then fail to open each other's
// first frame, and nothing else).
const aesKeyLabel = "mpvpn v1 transport aes-256-gcm"

// transport turns one CipherState of Split into the agreed Cipher's.
// ChaCha20-Poly1305 is Noise's own (the protocol as it was before
// negotiation, byte for byte). AES-256-GCM takes a key derived from
// Split's (keyed BLAKE2s-256, a PRF) and Noise's AESGCM nonce (32 zero
// bits, then the 64-bit counter, big-endian); the nonce starts at 0 and
// never repeats under a key, as with Noise's own.
func transport(c Cipher, cs *noise.CipherState) *noise.CipherState {
	if c != AES256GCM {
		return cs
	}
	split := cs.UnsafeKey()
	h, _ := blake2s.New256(split[:]) // a 32-byte key: cannot fail
	h.Write([]byte(aesKeyLabel))
	var k [32]byte
	h.Sum(k[:0])
	clear(split[:])
	return noise.UnsafeNewCipherState(aesSuite, k, cs.Nonce())
}
