package e2b

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"strings"
)

// keyPrefix starts every E2B API key, as E2B's own keys do ("e2b_" and 40
// hex digits), so tools that check the shape accept kiln's.
const keyPrefix = "e2b_"

// NewAPIKey returns a new key (160 random bits) and its stored hash.
func NewAPIKey() (key, hash string, err error) {
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return "", "", err
	}
	key = keyPrefix + hex.EncodeToString(b)
	return key, HashAPIKey(key), nil
}

// HashAPIKey is what the store keeps of a key: its SHA-256. The key is
// random, so no salt or slow hash is needed against guessing.
func HashAPIKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// KeyPrefixOf is the part of a key shown in lists.
func KeyPrefixOf(key string) string {
	if len(key) > 10 {
		return key[:10]
	}
	return key
}

// EnvdTokens mints and checks the envd access tokens the SDK sends to envd
// as X-Access-Token. A token is an HMAC of the account and sandbox under a
// key derived from the server's token key, so the endpoint proxy checks it
// without a database read. It lives as long as the sandbox (as E2B's do):
// once the microVM is gone the proxy has nowhere to route it.
type EnvdTokens struct {
	key    []byte
	prefix string
}

// Token prefixes version the formats and tell the two kinds apart.
const (
	envdTokenPrefix    = "ket1."
	trafficTokenPrefix = "ktt1."
)

// NewEnvdTokens derives the envd key from the server's token key, so
// endpoint tokens and envd tokens can never stand for each other.
func NewEnvdTokens(serverKey []byte) *EnvdTokens {
	return derivedTokens(serverKey, "kiln e2b envd access token v1", envdTokenPrefix)
}

// NewTrafficTokens mints and checks sandboxes' traffic access tokens (the
// E2b-Traffic-Access-Token a private sandbox's ports need), under a key
// of their own: a traffic token never opens envd, nor an envd token a
// port.
func NewTrafficTokens(serverKey []byte) *EnvdTokens {
	return derivedTokens(serverKey, "kiln e2b traffic access token v1", trafficTokenPrefix)
}

func derivedTokens(serverKey []byte, purpose, prefix string) *EnvdTokens {
	m := hmac.New(sha256.New, serverKey)
	m.Write([]byte(purpose))
	return &EnvdTokens{key: m.Sum(nil), prefix: prefix}
}

func (t *EnvdTokens) mac(account, sandboxID string) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte(account + "\x00" + sandboxID))
	return m.Sum(nil)
}

// Mint returns the envd access token of a sandbox.
func (t *EnvdTokens) Mint(account, sandboxID string) string {
	return t.prefix + base64.RawURLEncoding.EncodeToString(t.mac(account, sandboxID))
}

// Valid reports whether tok is the envd token of the account's sandbox.
func (t *EnvdTokens) Valid(tok, account, sandboxID string) bool {
	b64, ok := strings.CutPrefix(tok, t.prefix)
	if !ok || len(b64) > 64 {
		return false
	}
	sig, err := base64.RawURLEncoding.DecodeString(b64)
	if err != nil {
		return false
	}
	return hmac.Equal(sig, t.mac(account, sandboxID))
}
