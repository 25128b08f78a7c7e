//go:build linux

package tunnel

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// KeySize is the length of a Curve25519 key.
const KeySize = 32

// PrivateKey is a Curve25519 private key. Its text form (Base64Secret) is
// the standard base64 of the 32 bytes (44 characters), the format of `wg
// genkey`, so keys move freely between mpvpn and WireGuard tools; printed
// in any other way it shows as "(private key)".
type PrivateKey [KeySize]byte

// PublicKey is a Curve25519 public key, in text the format of `wg pubkey`.
type PublicKey [KeySize]byte

// GenerateKey returns a new random private key, clamped as RFC 7748 and
// `wg genkey` do. (X25519 clamps again when it uses the key; clamping the
// stored bytes only makes the key file identical in form to wg's.)
func GenerateKey() (PrivateKey, error) {
	var k PrivateKey
	if _, err := rand.Read(k[:]); err != nil {
		return PrivateKey{}, fmt.Errorf("read random bytes: %w", err)
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// Public returns the public key that belongs to k.
func (k PrivateKey) Public() PublicKey {
	// NewPrivateKey only fails on a wrong length, impossible here.
	priv, err := ecdh.X25519().NewPrivateKey(k[:])
	if err != nil {
		panic("tunnel: X25519 private key: " + err.Error())
	}
	var p PublicKey
	copy(p[:], priv.PublicKey().Bytes())
	return p
}

// Base64Secret returns the key in base64, as `wg genkey` prints it: the
// secret itself, for a key file and nothing else. Its name says so at the
// call site, and a grep for it finds every place the secret leaves the
// process as text.
func (k PrivateKey) Base64Secret() string { return base64.StdEncoding.EncodeToString(k[:]) }

// redactedKey is what a private key prints as, wherever it is printed.
const redactedKey = "(private key)"

// String returns "(private key)", never the key: a key passed to fmt, an
// error message or a log line by mistake must not reveal it. Base64Secret
// is the text form.
func (k PrivateKey) String() string { return redactedKey }

// GoString is String for %#v, which would otherwise print the bytes.
func (k PrivateKey) GoString() string { return "tunnel.PrivateKey" + redactedKey }

// Format redacts under every verb: fmt calls String for %v, %s, %q, %x
// and %X only, so %d or %o would print the bytes.
func (k PrivateKey) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		io.WriteString(f, k.GoString())
		return
	}
	io.WriteString(f, k.String())
}

// LogValue keeps a private key out of structured logs even when someone
// passes the key itself as an attribute.
func (k PrivateKey) LogValue() slog.Value { return slog.StringValue(redactedKey) }

// String returns the key in base64, as `wg pubkey` prints it.
func (k PublicKey) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// IsZero reports whether the key is all zero bytes (unset).
func (k PrivateKey) IsZero() bool { return k == PrivateKey{} }

// IsZero reports whether the key is all zero bytes (unset).
func (k PublicKey) IsZero() bool { return k == PublicKey{} }

// ParsePrivateKey parses a base64 private key as written by `mpvpn keygen`
// or `wg genkey`. Surrounding whitespace is ignored.
func ParsePrivateKey(s string) (PrivateKey, error) {
	b, err := parseKey("private", s)
	if err != nil {
		return PrivateKey{}, err
	}
	if b == ([KeySize]byte{}) {
		return PrivateKey{}, errors.New("private key is all zeros")
	}
	return PrivateKey(b), nil
}

// ParsePublicKey parses a base64 public key as written by `mpvpn pubkey`
// or `wg pubkey`. Surrounding whitespace is ignored.
func ParsePublicKey(s string) (PublicKey, error) {
	b, err := parseKey("public", s)
	if err != nil {
		return PublicKey{}, err
	}
	if b == ([KeySize]byte{}) {
		return PublicKey{}, errors.New("public key is all zeros")
	}
	return PublicKey(b), nil
}

func parseKey(kind, s string) ([KeySize]byte, error) {
	var k [KeySize]byte
	s = strings.TrimSpace(s)
	if s == "" {
		return k, fmt.Errorf("%s key is empty", kind)
	}
	want := base64.StdEncoding.EncodedLen(KeySize)
	if len(s) != want {
		return k, fmt.Errorf("%s key is %d characters long, want %d (base64 of 32 bytes, as `wg genkey`/`wg pubkey` print)", kind, len(s), want)
	}
	// Decode may write DecodedLen bytes (33 for 44 characters without
	// padding), so it gets a buffer of that size, not the key itself.
	buf := make([]byte, base64.StdEncoding.DecodedLen(len(s)))
	n, err := base64.StdEncoding.Decode(buf, []byte(s))
	if err != nil {
		return k, fmt.Errorf("%s key is not valid base64: %w", kind, err)
	}
	if n != KeySize {
		return k, fmt.Errorf("%s key decodes to %d bytes, want %d", kind, n, KeySize)
	}
	copy(k[:], buf)
	return k, nil
}

// staticStatic is the DH of an end's static key with a peer's static
// public key (Noise's "ss"), the same in every handshake between the two,
// and so computed once, at configuration. It is an error if pub is a
// low-order point (the shared secret would be all zeros): Noise's DH
// would fail on every handshake, so it is better refused at once with a
// clear message.
func staticStatic(k staticKey, pub PublicKey) ([]byte, error) {
	ss, err := x25519(k.priv, pub[:])
	if err != nil {
		return nil, fmt.Errorf("public key %s is not usable (low-order point): %w", pub, err)
	}
	return ss, nil
}
