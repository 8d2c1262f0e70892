// Package token mints and checks the access tokens the endpoint proxy
// requires (X-aws-proxy-auth, or the WebSocket subprotocol
// lambda-microvms.authentication.TOKEN). A token is self-contained and
// signed with HMAC-SHA256 under a server key, so the proxy checks it
// without a database read and a bad token never wakes a VM.
//
// Wire form: "kt1." + base64url(JSON claims) + "." + base64url(HMAC).
package token

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// MaxTTL is the longest lifetime a token may have (AWS: 60 minutes).
const MaxTTL = 60 * time.Minute

// MaxLen bounds the size of a token we are willing to parse.
const MaxLen = 4096

const prefix = "kt1."

// Errors. ErrMalformed and ErrBadSignature and ErrExpired mean "not
// authenticated" (401); ErrScope means "authenticated, not allowed" (403).
var (
	ErrMalformed    = errors.New("malformed token")
	ErrBadSignature = errors.New("token signature mismatch")
	ErrExpired      = errors.New("token expired")
	ErrScope        = errors.New("token does not grant this microvm or port")
	ErrInvalid      = errors.New("invalid token request")
)

// Kind separates endpoint tokens (CreateMicrovmAuthToken) from shell
// tokens (CreateMicrovmShellAuthToken), so one cannot be used as the other.
type Kind string

const (
	KindEndpoint Kind = "endpoint"
	KindShell    Kind = "shell"
)

// PortRange is an inclusive range of guest TCP ports; a single port has
// From == To. AllPorts grants every port.
type PortRange struct {
	From uint16 `json:"f"`
	To   uint16 `json:"t"`
}

// AllPorts is the allPorts port specification.
var AllPorts = PortRange{From: 1, To: 65535}

// Port is a single-port specification.
func Port(p uint16) PortRange { return PortRange{From: p, To: p} }

// Claims is what a token says.
type Claims struct {
	Account   string      `json:"a"`
	MicrovmID string      `json:"m"`
	Kind      Kind        `json:"k"`
	Ports     []PortRange `json:"p"`
	IssuedAt  int64       `json:"iat"` // unix seconds
	ExpiresAt int64       `json:"exp"` // unix seconds
	// Nonce makes two tokens minted in the same second differ.
	Nonce string `json:"n"`
}

// Expiry returns ExpiresAt as a time.
func (c Claims) Expiry() time.Time { return time.Unix(c.ExpiresAt, 0) }

// AllowsPort reports whether port p is inside one of the granted ranges.
func (c Claims) AllowsPort(p uint16) bool {
	for _, r := range c.Ports {
		if p >= r.From && p <= r.To {
			return true
		}
	}
	return false
}

// Signer mints and verifies tokens. The first key signs; every key
// verifies, so a key can be rotated without cutting off live tokens.
type Signer struct {
	keys     [][]byte
	now      func() time.Time
	verified *verifiedCache
}

// verifiedCache remembers the claims of tokens whose signature checked
// out, so a client sending the same token on every request costs a map
// lookup instead of an HMAC and a JSON decode. Only verified tokens go
// in, so forged ones cannot fill it; expiry is checked on every use.
type verifiedCache struct {
	mu sync.RWMutex
	m  map[string]Claims
}

const verifiedCacheSize = 4096

func (c *verifiedCache) get(tok string) (Claims, bool) {
	c.mu.RLock()
	cl, ok := c.m[tok]
	c.mu.RUnlock()
	// The caller gets its own Ports: the cached claims stay as verified.
	cl.Ports = append([]PortRange(nil), cl.Ports...)
	return cl, ok
}

func (c *verifiedCache) put(tok string, cl Claims, now int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= verifiedCacheSize {
		for k, v := range c.m {
			if now >= v.ExpiresAt {
				delete(c.m, k)
			}
		}
		// Still full: drop any quarter (map order); a miss only costs a
		// verification.
		for k := range c.m {
			if len(c.m) < verifiedCacheSize*3/4 {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[tok] = cl
}

// NewSigner returns a Signer; each key must be at least 32 bytes.
func NewSigner(keys ...[]byte) (*Signer, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("no signing key: %w", ErrInvalid)
	}
	for i, k := range keys {
		if len(k) < 32 {
			return nil, fmt.Errorf("key %d is %d bytes, need 32: %w", i, len(k), ErrInvalid)
		}
	}
	return &Signer{keys: keys, now: time.Now, verified: &verifiedCache{m: map[string]Claims{}}}, nil
}

// WithClock returns a copy of s that reads the time from now (tests, and
// callers that want one clock for minting and checking).
func (s *Signer) WithClock(now func() time.Time) *Signer {
	c := *s
	c.now = now
	return &c
}

// LoadOrCreateKey reads a 32-byte key from path, creating it (mode 0600)
// with fresh random bytes on first use.
func LoadOrCreateKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		if len(b) < 32 {
			return nil, fmt.Errorf("token key %s is too short: %w", path, ErrInvalid)
		}
		return b, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading token key: %w", err)
	}
	b = make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating key dir: %w", err)
	}
	// O_EXCL: if two processes race, one wins and the other re-reads.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return LoadOrCreateKey(path)
	}
	if err != nil {
		return nil, fmt.Errorf("creating token key: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing token key: %w", err)
	}
	return b, f.Close()
}

// Mint signs a token for microvmID granting ports for ttl (1s..MaxTTL).
func (s *Signer) Mint(account, microvmID string, kind Kind, ports []PortRange, ttl time.Duration) (string, Claims, error) {
	if microvmID == "" || len(microvmID) > 256 {
		return "", Claims{}, fmt.Errorf("microvm id: %w", ErrInvalid)
	}
	if ttl <= 0 || ttl > MaxTTL {
		return "", Claims{}, fmt.Errorf("ttl %s outside (0, %s]: %w", ttl, MaxTTL, ErrInvalid)
	}
	if kind != KindEndpoint && kind != KindShell {
		return "", Claims{}, fmt.Errorf("kind %q: %w", kind, ErrInvalid)
	}
	if len(ports) == 0 || len(ports) > 64 {
		return "", Claims{}, fmt.Errorf("need 1-64 port specifications: %w", ErrInvalid)
	}
	for _, r := range ports {
		if r.From == 0 || r.From > r.To {
			return "", Claims{}, fmt.Errorf("port range %d-%d: %w", r.From, r.To, ErrInvalid)
		}
	}
	nonce := make([]byte, 9)
	rand.Read(nonce)
	now := s.now()
	c := Claims{
		Account: account, MicrovmID: microvmID, Kind: kind, Ports: ports,
		IssuedAt: now.Unix(), ExpiresAt: now.Add(ttl).Unix(),
		Nonce: base64.RawURLEncoding.EncodeToString(nonce),
	}
	body, err := json.Marshal(c)
	if err != nil {
		return "", Claims{}, err
	}
	payload := prefix + base64.RawURLEncoding.EncodeToString(body)
	tok := payload + "." + base64.RawURLEncoding.EncodeToString(mac(s.keys[0], payload))
	if len(tok) > MaxLen {
		return "", Claims{}, fmt.Errorf("token too long: %w", ErrInvalid)
	}
	return tok, c, nil
}

// Parse checks the signature and expiry and returns the claims. It does
// not check which microvm or port the token is for: use Authorize.
func (s *Signer) Parse(tok string) (Claims, error) {
	if len(tok) > MaxLen || !strings.HasPrefix(tok, prefix) {
		return Claims{}, ErrMalformed
	}
	now := s.now()
	if c, ok := s.verified.get(tok); ok {
		if now.Unix() >= c.ExpiresAt {
			return Claims{}, ErrExpired
		}
		return c, nil
	}
	i := strings.LastIndexByte(tok, '.')
	if i <= len(prefix) {
		return Claims{}, ErrMalformed
	}
	payload, sigText := tok[:i], tok[i+1:]
	sig, err := base64.RawURLEncoding.DecodeString(sigText)
	if err != nil {
		return Claims{}, ErrMalformed
	}
	ok := false
	for _, k := range s.keys {
		if hmac.Equal(sig, mac(k, payload)) {
			ok = true
		}
	}
	if !ok {
		return Claims{}, ErrBadSignature
	}
	body, err := base64.RawURLEncoding.DecodeString(payload[len(prefix):])
	if err != nil {
		return Claims{}, ErrMalformed
	}
	var c Claims
	if err := json.Unmarshal(body, &c); err != nil {
		return Claims{}, ErrMalformed
	}
	// Reject tokens claiming a lifetime above MaxTTL even if signed: a
	// defence against a leaked signing path that skipped Mint's checks.
	if c.ExpiresAt-c.IssuedAt > int64(MaxTTL/time.Second) {
		return Claims{}, ErrMalformed
	}
	if now.Unix() >= c.ExpiresAt {
		return Claims{}, ErrExpired
	}
	s.verified.put(tok, c, now.Unix())
	return c, nil
}

// Authorize parses tok and checks that it grants kind access to port on
// microvmID.
func (s *Signer) Authorize(tok, microvmID string, kind Kind, port uint16) (Claims, error) {
	c, err := s.Parse(tok)
	if err != nil {
		return Claims{}, err
	}
	if c.MicrovmID != microvmID || c.Kind != kind || !c.AllowsPort(port) {
		return c, ErrScope
	}
	return c, nil
}

func mac(key []byte, payload string) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(payload))
	return h.Sum(nil)
}
