//go:build linux

package tunnel

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// A private key printed by mistake, in any form fmt, errors or slog
// make, shows as "(private key)": never its base64, hex or bytes.
func TestPrivateKeyRedacted(t *testing.T) {
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	secret := k.Base64Secret()
	// Forms of the secret a printout could carry. The decimal bytes are
	// checked as a run of a few, which no redaction text contains.
	forms := []string{
		secret,
		base64.RawStdEncoding.EncodeToString(k[:]),
		hex.EncodeToString(k[:]),
		strings.ToUpper(hex.EncodeToString(k[:])),
		strings.Trim(fmt.Sprint(k[:4]), "[]"),
		fmt.Sprintf("%#x", k[0]) + ", " + fmt.Sprintf("%#x", k[1]),
	}
	type config struct {
		Name string
		Key  PrivateKey
	}
	var logs bytes.Buffer
	text := slog.New(slog.NewTextHandler(&logs, nil))
	json := slog.New(slog.NewJSONHandler(&logs, nil))
	text.Info("key", "key", k, "cfg", config{"c", k})
	json.Info("key", "key", k)

	tests := []struct{ name, got string }{
		{"Sprint", fmt.Sprint(k)},
		{"Sprintln", fmt.Sprintln(k)},
		{"%v", fmt.Sprintf("%v", k)},
		{"%+v", fmt.Sprintf("%+v", k)},
		{"%#v", fmt.Sprintf("%#v", k)},
		{"%s", fmt.Sprintf("%s", k)},
		{"%q", fmt.Sprintf("%q", k)},
		{"%x", fmt.Sprintf("%x", k)},
		{"%X", fmt.Sprintf("%X", k)},
		{"%d", fmt.Sprintf("%d", k)},
		{"%o", fmt.Sprintf("%o", k)},
		{"%b", fmt.Sprintf("%b", k)},
		{"pointer %v", fmt.Sprintf("%v", &k)},
		{"in a struct %v", fmt.Sprintf("%v", config{"c", k})},
		{"in a struct %+v", fmt.Sprintf("%+v", config{"c", k})},
		{"in a struct %#v", fmt.Sprintf("%#v", config{"c", k})},
		{"in a slice", fmt.Sprint([]PrivateKey{k})},
		{"String", k.String()},
		{"GoString", k.GoString()},
		{"wrapped error", fmt.Errorf("bad key %v: %w", k, errors.New("x")).Error()},
		{"slog", logs.String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, f := range forms {
				if strings.Contains(tt.got, f) {
					t.Errorf("%q contains the key (%q)", tt.got, f)
				}
			}
			if !strings.Contains(tt.got, "(private key)") {
				t.Errorf("%q does not say it is a private key", tt.got)
			}
		})
	}
}

// Base64Secret is the key file's form: what ParsePrivateKey reads and
// `wg genkey` writes.
func TestPrivateKeyBase64Secret(t *testing.T) {
	// RFC 7748 §6.1: Alice's private key.
	raw, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	want := base64.StdEncoding.EncodeToString(raw)
	k, err := ParsePrivateKey(want)
	if err != nil {
		t.Fatal(err)
	}
	if got := k.Base64Secret(); got != want {
		t.Errorf("Base64Secret() = %q, want %q", got, want)
	}
	k2, err := ParsePrivateKey(k.Base64Secret())
	if err != nil || k2 != k {
		t.Errorf("round trip: %v", err)
	}
}
