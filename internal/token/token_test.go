package token

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func newSigner(t *testing.T, now *time.Time) *Signer {
	t.Helper()
	s, err := NewSigner(bytes.Repeat([]byte("k"), 32))
	if err != nil {
		t.Fatal(err)
	}
	s.now = func() time.Time { return *now }
	return s
}

func TestAuthorize(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	s := newSigner(t, &now)
	mint := func(ports []PortRange, kind Kind, ttl time.Duration) string {
		tok, _, err := s.Mint("acct1", "vm-1", kind, ports, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	single := mint([]PortRange{Port(8080)}, KindEndpoint, time.Minute)
	rng := mint([]PortRange{{From: 3000, To: 3010}, Port(9000)}, KindEndpoint, time.Minute)
	all := mint([]PortRange{AllPorts}, KindEndpoint, MaxTTL)
	shell := mint([]PortRange{Port(8022)}, KindShell, time.Minute)
	other, _, _ := s.Mint("acct1", "vm-2", KindEndpoint, []PortRange{AllPorts}, time.Minute)
	otherKey, _ := NewSigner(bytes.Repeat([]byte("x"), 32))
	forged, _, _ := otherKey.Mint("acct1", "vm-1", KindEndpoint, []PortRange{AllPorts}, time.Minute)
	// Tamper: swap the payload of a narrow token for a wider one, keep its MAC.
	tampered := all[:strings.LastIndexByte(all, '.')] + single[strings.LastIndexByte(single, '.'):]

	tests := []struct {
		name  string
		tok   string
		vm    string
		kind  Kind
		port  uint16
		after time.Duration
		want  error
	}{
		{"single port ok", single, "vm-1", KindEndpoint, 8080, 0, nil},
		{"single port other port", single, "vm-1", KindEndpoint, 8081, 0, ErrScope},
		{"range low edge", rng, "vm-1", KindEndpoint, 3000, 0, nil},
		{"range high edge", rng, "vm-1", KindEndpoint, 3010, 0, nil},
		{"range outside", rng, "vm-1", KindEndpoint, 3011, 0, ErrScope},
		{"second spec", rng, "vm-1", KindEndpoint, 9000, 0, nil},
		{"all ports", all, "vm-1", KindEndpoint, 1, 0, nil},
		{"all ports 65535", all, "vm-1", KindEndpoint, 65535, 0, nil},
		{"all ports near expiry", all, "vm-1", KindEndpoint, 80, MaxTTL - time.Second, nil},
		{"all ports at expiry", all, "vm-1", KindEndpoint, 80, MaxTTL, ErrExpired},
		{"expired", single, "vm-1", KindEndpoint, 8080, 2 * time.Minute, ErrExpired},
		{"other microvm", other, "vm-1", KindEndpoint, 8080, 0, ErrScope},
		{"endpoint token for shell", all, "vm-1", KindShell, 8022, 0, ErrScope},
		{"shell token for endpoint", shell, "vm-1", KindEndpoint, 8022, 0, ErrScope},
		{"shell token", shell, "vm-1", KindShell, 8022, 0, nil},
		{"other key", forged, "vm-1", KindEndpoint, 8080, 0, ErrBadSignature},
		{"tampered payload", tampered, "vm-1", KindEndpoint, 8080, 0, ErrBadSignature},
		{"truncated", single[:len(single)-3], "vm-1", KindEndpoint, 8080, 0, ErrBadSignature},
		{"garbage", "hello", "vm-1", KindEndpoint, 8080, 0, ErrMalformed},
		{"empty", "", "vm-1", KindEndpoint, 8080, 0, ErrMalformed},
		{"huge", "kt1." + strings.Repeat("A", MaxLen), "vm-1", KindEndpoint, 8080, 0, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			saved := now
			now = now.Add(tc.after)
			defer func() { now = saved }()
			_, err := s.Authorize(tc.tok, tc.vm, tc.kind, tc.port)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestMintInvalid(t *testing.T) {
	now := time.Now()
	s := newSigner(t, &now)
	tests := []struct {
		name  string
		vm    string
		kind  Kind
		ports []PortRange
		ttl   time.Duration
	}{
		{"ttl over 60 min", "vm", KindEndpoint, []PortRange{AllPorts}, MaxTTL + time.Second},
		{"zero ttl", "vm", KindEndpoint, []PortRange{AllPorts}, 0},
		{"no ports", "vm", KindEndpoint, nil, time.Minute},
		{"reversed range", "vm", KindEndpoint, []PortRange{{From: 10, To: 5}}, time.Minute},
		{"port zero", "vm", KindEndpoint, []PortRange{Port(0)}, time.Minute},
		{"no vm", "", KindEndpoint, []PortRange{AllPorts}, time.Minute},
		{"bad kind", "vm", "admin", []PortRange{AllPorts}, time.Minute},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := s.Mint("a", tc.vm, tc.kind, tc.ports, tc.ttl); !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
}

func TestKeyRotation(t *testing.T) {
	oldK, newK := bytes.Repeat([]byte("o"), 32), bytes.Repeat([]byte("n"), 32)
	old, _ := NewSigner(oldK)
	tok, _, err := old.Mint("a", "vm", KindEndpoint, []PortRange{AllPorts}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	rotated, _ := NewSigner(newK, oldK)
	if _, err := rotated.Authorize(tok, "vm", KindEndpoint, 80); err != nil {
		t.Fatalf("old token after rotation: %v", err)
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sub", "token.key")
	a, err := LoadOrCreateKey(p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateKey(p)
	if err != nil || !bytes.Equal(a, b) || len(a) != 32 {
		t.Fatalf("reload: %v, equal=%v len=%d", err, bytes.Equal(a, b), len(a))
	}
}

// TestVerifiedCache: a token checked once is served from the cache, still
// expires on time and keeps its scope; forged tokens never enter; the
// cache stays bounded.
func TestVerifiedCache(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	s := newSigner(t, &now)
	tok, _, err := s.Mint("acct1", "vm-1", KindEndpoint, []PortRange{Port(8080)}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := s.Authorize(tok, "vm-1", KindEndpoint, 8080); err != nil {
			t.Fatalf("check %d: %v", i, err)
		}
	}
	if _, ok := s.verified.get(tok); !ok {
		t.Fatal("a verified token is not cached")
	}
	if _, err := s.Authorize(tok, "vm-1", KindEndpoint, 9090); !errors.Is(err, ErrScope) {
		t.Fatalf("cached token, other port: %v, want ErrScope", err)
	}
	now = now.Add(time.Minute)
	if _, err := s.Authorize(tok, "vm-1", KindEndpoint, 8080); !errors.Is(err, ErrExpired) {
		t.Fatalf("cached token after expiry: %v, want ErrExpired", err)
	}
	other, _ := NewSigner(bytes.Repeat([]byte("x"), 32))
	forged, _, _ := other.Mint("acct1", "vm-1", KindEndpoint, []PortRange{AllPorts}, time.Minute)
	s.Authorize(forged, "vm-1", KindEndpoint, 8080)
	if _, ok := s.verified.get(forged); ok {
		t.Fatal("a forged token entered the cache")
	}
	for i := 0; i < verifiedCacheSize+100; i++ {
		tok, _, _ := s.Mint("acct1", "vm-1", KindEndpoint, []PortRange{Port(8080)}, time.Minute)
		if _, err := s.Parse(tok); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(s.verified.m); n > verifiedCacheSize {
		t.Fatalf("cache holds %d tokens, bound %d", n, verifiedCacheSize)
	}
}
