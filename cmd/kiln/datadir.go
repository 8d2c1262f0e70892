package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// Files in DATA_DIR that hold secrets: kept 0600 (the database and its
// WAL and SHM are kept so by internal/store/sqlite).
var secretFiles = []string{
	"credentials",  // the admin access key
	sqlite.KeyFile, // seals the secret access keys in kiln.db
	"token.key",    // signs endpoint tokens
	"tls/ca.key",   // kiln's own CA for the endpoints
	"tls/leaf.key",
}

// secureDataDir creates DATA_DIR 0700 (or brings it back to 0700) and
// brings every secret file in it that exists back to 0600: files an older
// kiln, a restore from backup or a careless copy left readable.
func secureDataDir(dir string) error {
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

// openStore opens DATA_DIR/kiln.db with the sealing key
// DATA_DIR/secrets.key (both created on first use), after securing
// DATA_DIR: every command that touches the store goes through here.
func openStore(ctx context.Context, dir string) (*sqlite.Store, error) {
	if err := secureDataDir(dir); err != nil {
		return nil, err
	}
	sl, err := seal.LoadOrCreate(filepath.Join(dir, sqlite.KeyFile))
	if err != nil {
		return nil, err
	}
	return sqlite.Open(ctx, filepath.Join(dir, "kiln.db"), sqlite.WithSealer(sl))
}
