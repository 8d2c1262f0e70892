package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/postgres"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// Files in DATA_DIR that hold secrets: kept 0600 (the database and its
// WAL and SHM are kept so by internal/store/sqlite).
var secretFiles = []string{
	"credentials",  // the admin access key
	sqlite.KeyFile, // seals the secret access keys in the store
	"token.key",    // signs endpoint tokens
	"tls/ca.key",   // kiln's own CA for the endpoints
	"tls/leaf.key",
}

// SecureDataDir creates DATA_DIR 0700 (or brings it back to 0700) and
// brings every secret file in it that exists back to 0600: files an older
// kiln, a restore from backup or a careless copy left readable.
func SecureDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating data directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("securing data directory: %w", err)
	}
	if err := os.Chmod(filepath.Join(dir, "tls"), 0o700); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("securing %s: %w", filepath.Join(dir, "tls"), err)
	}
	for _, name := range secretFiles {
		p := filepath.Join(dir, name)
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("securing %s: %w", p, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s is not a regular file (a symbolic link?): refusing to use it as a key file", p)
		}
		if fi.Mode().Perm() != 0o600 {
			slog.Warn("key file was readable by others; set to 0600", "file", p, "mode", fi.Mode().Perm().String())
			if err := os.Chmod(p, 0o600); err != nil {
				return fmt.Errorf("securing %s: %w", p, err)
			}
		}
	}
	return nil
}

// warnIfReadable warns when an operator-supplied key file (outside
// DATA_DIR, so not ours to change) can be read by other users.
func warnIfReadable(path string) {
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		slog.Warn("private key file is readable by other users; chmod 600 it", "file", path, "mode", fi.Mode().Perm().String())
	}
}

// StoreOptions name a kiln state store.
type StoreOptions struct {
	// DataDir is DATA_DIR.
	DataDir string
	// Store is --store: "" or "sqlite" for DATA_DIR/kiln.db (the embedded
	// default), or a postgres:// URL.
	Store string
	// SealingKey is --sealing-key: "" for DATA_DIR/secrets.key (made on
	// first use), or the operator's file.
	SealingKey string
}

// loadSealer is --sealing-key as given (an operator's file, perhaps a
// read-only Kubernetes Secret: used as is, never created or chmodded),
// or DATA_DIR/secrets.key, made on first use.
func loadSealer(dir, sealingKey string) (*seal.Sealer, error) {
	if sealingKey == "" {
		return seal.LoadOrCreate(filepath.Join(dir, sqlite.KeyFile))
	}
	b, err := os.ReadFile(sealingKey)
	if err != nil {
		return nil, fmt.Errorf("--sealing-key: %w (make one with `head -c 32 /dev/urandom > FILE` and give every control replica the same)", err)
	}
	sl, err := seal.New(b)
	if err != nil {
		return nil, fmt.Errorf("--sealing-key %s: %w", sealingKey, err)
	}
	return sl, nil
}

// LoadTokenKey is the key endpoint tokens are signed with: --token-key as
// given (an operator's file that every control replica and edge shares;
// it must exist), or DATA_DIR/token.key, made on first use.
func LoadTokenKey(o Options) ([]byte, error) {
	if o.TokenKey == "" {
		return token.LoadOrCreateKey(filepath.Join(o.DataDir, "token.key"))
	}
	if _, err := os.Stat(o.TokenKey); err != nil {
		return nil, fmt.Errorf("--token-key: %w (make one with `head -c 32 /dev/urandom > FILE` and give every control replica and edge the same)", err)
	}
	return token.LoadOrCreateKey(o.TokenKey)
}

// OpenStore opens the store --store names (DATA_DIR/kiln.db by default)
// with the sealing key DATA_DIR/secrets.key (both created on first use)
// or --sealing-key, after securing DATA_DIR: every command that touches
// the store goes through here. Every process sharing a PostgreSQL store
// that unseals access keys (control, the key commands) needs the same key.
func OpenStore(ctx context.Context, o StoreOptions) (store.Store, error) {
	if err := SecureDataDir(o.DataDir); err != nil {
		return nil, err
	}
	sl, err := loadSealer(o.DataDir, o.SealingKey)
	if err != nil {
		return nil, err
	}
	switch {
	case o.Store == "" || o.Store == "sqlite":
		return sqlite.Open(ctx, filepath.Join(o.DataDir, "kiln.db"), sqlite.WithSealer(sl))
	case postgres.IsURL(o.Store):
		return postgres.Open(ctx, o.Store, sl)
	}
	// Not echoed: a mistyped URL may carry a password.
	return nil, fmt.Errorf("--store must be sqlite or a postgres://user:password@host/db URL")
}
