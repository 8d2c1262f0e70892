// Package seal encrypts the secrets kiln keeps in its state store (the
// secret access keys) with AES-256-GCM under a key that lives in its own
// file, apart from the database, so that a copy of the database alone
// reveals no secret. Any store implementation (SQLite now, PostgreSQL
// later) takes a *Sealer and seals before it writes.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// KeySize is the length of a sealing key (AES-256).
const KeySize = 32

// prefix marks a sealed value. Plaintext secrets (base64 of random bytes)
// never contain ':', so a stored value is either sealed or plaintext from
// an older kiln, never ambiguous.
const prefix = "kiln-sealed:v1:"

// Sealer seals and opens short secrets. It is safe for concurrent use.
type Sealer struct {
	aead cipher.AEAD
}

// New returns a Sealer for a KeySize-byte key.
func New(key []byte) (*Sealer, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("sealing key is %d bytes, want %d: %w", len(key), KeySize, errdefs.ErrInvalid)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("sealing key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("sealing key: %w", err)
	}
	return &Sealer{aead: aead}, nil
}

// Seal encrypts plaintext bound to context (for instance the access key
// id), so a sealed value copied onto another record does not open.
func (s *Sealer) Seal(plaintext, context string) (string, error) {
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(plaintext)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", fmt.Errorf("sealing: %w", err)
	}
	out := s.aead.Seal(nonce, nonce, []byte(plaintext), []byte(context))
	return prefix + base64.RawStdEncoding.EncodeToString(out), nil
}

// Open decrypts a value made by Seal with the same context.
func (s *Sealer) Open(sealed, context string) (string, error) {
	if !IsSealed(sealed) {
		return "", fmt.Errorf("value is not sealed: %w", errdefs.ErrInvalid)
	}
	b, err := base64.RawStdEncoding.DecodeString(sealed[len(prefix):])
	if err != nil || len(b) < s.aead.NonceSize()+s.aead.Overhead() {
		return "", fmt.Errorf("sealed value is malformed: %w", errdefs.ErrInvalid)
	}
	n := s.aead.NonceSize()
	pt, err := s.aead.Open(nil, b[:n], b[n:], []byte(context))
	if err != nil {
		return "", fmt.Errorf("sealed value does not open with this key (wrong or replaced key file?): %w", errdefs.ErrInvalid)
	}
	return string(pt), nil
}

// IsSealed reports whether a stored value was made by Seal.
func IsSealed(v string) bool { return strings.HasPrefix(v, prefix) }

// LoadOrCreate reads the sealing key at path, creating it (mode 0600, with
// fresh random bytes) on first use, and returns its Sealer. An existing
// key file is brought back to mode 0600.
func LoadOrCreate(path string) (*Sealer, error) {
	key, err := loadOrCreateKey(path)
	if err != nil {
		return nil, err
	}
	return New(key)
}

func loadOrCreateKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		if len(b) != KeySize {
			return nil, fmt.Errorf("sealing key %s is %d bytes, want %d (restore it from a backup; without it the stored secrets cannot be read): %w",
				path, len(b), KeySize, errdefs.ErrInvalid)
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return nil, fmt.Errorf("securing sealing key: %w", err)
		}
		return b, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading sealing key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating sealing key directory: %w", err)
	}
	b = make([]byte, KeySize)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("generating sealing key: %w", err)
	}
	// Written under a temporary name and linked into place, so that a
	// crash never leaves a short key, and two racing processes agree on one.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".sealkey-*")
	if err != nil {
		return nil, fmt.Errorf("creating sealing key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("creating sealing key: %w", err)
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("writing sealing key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("writing sealing key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("writing sealing key: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return loadOrCreateKey(path)
		}
		return nil, fmt.Errorf("installing sealing key: %w", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return b, nil
}
