//go:build linux

package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The cache holds one entry per step result, in
// DATA_DIR/image-cache/accounts/SCOPE/KEY, where SCOPE is ScopeName of the
// account that built it: an account never reads another's entries, so a
// forged base or a guessed input of another tenant finds nothing. Only
// managed bases (built by kiln from its configured sources) are kept once
// for all, in DATA_DIR/image-cache/shared/KEY. RUN --mount=type=cache
// disks are in DATA_DIR/image-cache/mounts/SCOPE (mounts.go). Each entry
// holds:
//
//	rootfs/     the root as a folder (after a host-side step), or
//	root.ext4   the root as a disk (after a RUN step)
//	final.ext4  the finished read-only disk (final entries only)
//	meta.json   what produced it
//
// Entries are written under a temporary name and renamed into place, so
// a reader sees a whole entry or none; two builds racing on one key keep
// the first and drop the second. Entries are never modified after that.
type cache struct{ dir string }

// Folders of the image cache under DATA_DIR/image-cache.
const (
	cacheAccounts = "accounts"
	cacheShared   = "shared"
)

func accountCache(dataDir, account string) cache {
	return cache{dir: filepath.Join(dataDir, "image-cache", cacheAccounts, ScopeName(account))}
}

func sharedCache(dataDir string) cache {
	return cache{dir: filepath.Join(dataDir, "image-cache", cacheShared)}
}

// ScopeName is the folder name of an account's own part of a cache: a
// hash, so any account id (whatever characters it holds) makes one safe
// path element and the folder names no account in clear.
func ScopeName(account string) string {
	h := sha256.Sum256([]byte("kiln cache scope\x00" + account))
	return hex.EncodeToString(h[:16])
}

type entryKind int

const (
	kindFolder entryKind = iota
	kindDisk
)

type entryMeta struct {
	Key         string `json:"key"`
	Instruction string `json:"instruction"`
	Kind        string `json:"kind"`
}

func (c cache) path(key string) string { return filepath.Join(c.dir, key) }

// lookup returns the entry for key, if complete.
func (c cache) lookup(key string) (dir string, kind entryKind, ok bool) {
	dir = c.path(key)
	meta := filepath.Join(dir, "meta.json")
	if _, err := os.Stat(meta); err != nil {
		return "", 0, false
	}
	// The time of last use, for PruneCache.
	now := time.Now()
	_ = os.Chtimes(meta, now, now)
	if _, err := os.Stat(filepath.Join(dir, "root.ext4")); err == nil {
		return dir, kindDisk, true
	}
	if _, err := os.Stat(filepath.Join(dir, "rootfs")); err == nil {
		return dir, kindFolder, true
	}
	return "", 0, false
}

// store copies the private root at src (a folder or a disk) into the entry
// for key.
func (c cache) store(ctx context.Context, key, instruction, src string, kind entryKind) (string, error) {
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return "", fmt.Errorf("creating image cache: %w", err)
	}
	tmp, err := os.MkdirTemp(c.dir, ".tmp-"+key[:12]+"-")
	if err != nil {
		return "", fmt.Errorf("creating cache entry: %w", err)
	}
	defer os.RemoveAll(tmp)
	name := "rootfs"
	if kind == kindDisk {
		name = "root.ext4"
	}
	if err := cpTree(ctx, src, filepath.Join(tmp, name)); err != nil {
		return "", fmt.Errorf("storing cache entry: %w", err)
	}
	k := "folder"
	if kind == kindDisk {
		k = "disk"
	}
	m, _ := json.Marshal(entryMeta{Key: key, Instruction: instruction, Kind: k})
	if err := os.WriteFile(filepath.Join(tmp, "meta.json"), m, 0o600); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, c.path(key)); err != nil {
		if errors.Is(err, fs.ErrExist) || errors.Is(err, syscall.ENOTEMPTY) {
			return c.path(key), nil // a concurrent build stored it first
		}
		return "", fmt.Errorf("placing cache entry: %w", err)
	}
	return c.path(key), nil
}

// cpTree copies a folder or file with cp -a, which keeps owners, modes,
// links, hard links, xattrs and holes, and reflinks where the file system
// can.
func cpTree(ctx context.Context, src, dst string) error {
	cmd := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", "--sparse=always", src, dst)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cp -a %s %s: %s: %w", src, dst, strings.TrimSpace(out.String()), err)
	}
	return nil
}

// keyOf hashes the parts of a step's inputs into a cache key.
func keyOf(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// PruneCache removes cache entries under dataDir not used for maxAge (a
// hit refreshes an entry's time) and half-written entries left by a crash,
// in every account's part and the shared one. Entries of the unscoped
// layout of older versions (DATA_DIR/image-cache/KEY) are removed whatever
// their age: no build may read them again, since nothing says which account
// made them. Safe to run while builds run: an entry in use by a build is
// one it just used, so it is not old.
func PruneCache(dataDir string, maxAge time.Duration) (removed int, err error) {
	dir := filepath.Join(dataDir, "image-cache")
	ents, err := os.ReadDir(dir)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	cutoff := time.Now().Add(-maxAge)
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		switch e.Name() {
		case cacheShared:
			removed += pruneEntries(p, cutoff)
		case cacheAccounts, cacheMounts:
			prune := pruneEntries
			if e.Name() == cacheMounts {
				prune = pruneCacheMounts
			}
			scopes, err := os.ReadDir(p)
			if err != nil {
				return removed, err
			}
			for _, sc := range scopes {
				removed += prune(filepath.Join(p, sc.Name()), cutoff)
			}
		default:
			if os.RemoveAll(p) == nil {
				removed++
			}
		}
	}
	return removed, nil
}

// pruneEntries removes the entries of one cache folder last used before
// cutoff, and half-written ones as old.
func pruneEntries(dir string, cutoff time.Time) (removed int) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		fi, err := os.Stat(filepath.Join(p, "meta.json"))
		if strings.HasPrefix(e.Name(), ".tmp-") {
			fi, err = os.Stat(p)
		}
		if err != nil || fi.ModTime().Before(cutoff) {
			if os.RemoveAll(p) == nil {
				removed++
			}
		}
	}
	return removed
}
