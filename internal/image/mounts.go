//go:build linux

package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"golang.org/x/sys/unix"
)

// RUN --mount. A cache mount is an ext4 disk image per account and cache
// id, in DATA_DIR/image-cache/mounts/SCOPE/ (SCOPE = ScopeName of the
// account): never shared across accounts, never part of a step's key or
// of the image. The build VM gets it as an extra disk and its guest
// mounts it; the host only ever hands the file to QEMU as raw, so what a
// guest wrote there is read by the next guest of the same account alone.
// A bind mount is an ext4 image made for the step from the build context
// (after .dockerignore), read-only unless rw; its contents are part of
// the step's key, as in BuildKit.

// Defaults of Builder's cache mount bounds.
const (
	DefaultCacheMountBytes = 4 << 30
	DefaultMaxCacheMounts  = 32
)

const cacheMounts = "mounts"

// mountPlan is a RUN --mount after expansion, with what its key needs.
type mountPlan struct {
	m      dockerfile.Mount // Target absolute; ID set for caches
	source string           // bind: cleaned name in the context
}

// planMounts resolves the step's mounts and returns the part of the
// step's key they make: everything written, plus a bind source's
// contents; never a cache's contents.
func (bd *build) planMounts(ctx context.Context, st *stageState, s dockerfile.Step) ([]mountPlan, string, error) {
	if len(s.Mounts) == 0 {
		return nil, "", nil
	}
	if len(s.Mounts) > maxRunMounts {
		return nil, "", fmt.Errorf("%w: RUN has %d --mount flags; kiln takes at most %d", ErrInvalid, len(s.Mounts), maxRunMounts)
	}
	h := sha256.New()
	var plans []mountPlan
	targets := map[string]bool{}
	for _, m := range s.Mounts {
		what := fmt.Sprintf("RUN --mount=type=%s,target=%s", m.Type, m.Target)
		if m.Target == "" {
			return nil, "", fmt.Errorf("%w: %s: the target is empty", ErrInvalid, what)
		}
		t := m.Target
		if !path.IsAbs(t) {
			t = path.Join(orRoot(st.cfg.WorkingDir), t)
		}
		t = path.Clean(t)
		if t == "/" {
			return nil, "", fmt.Errorf("%w: %s: a mount cannot hide the whole root; pick a folder", ErrInvalid, what)
		}
		if targets[t] {
			return nil, "", fmt.Errorf("%w: %s: two mounts at one target", ErrInvalid, what)
		}
		targets[t] = true
		m.Target = t
		p := mountPlan{m: m}
		if m.Type == dockerfile.MountCache {
			if m.ID == "" {
				p.m.ID = t
			}
			if p.m.Sharing == "" {
				p.m.Sharing = dockerfile.SharingShared
			}
		}
		b, _ := json.Marshal(p.m)
		fmt.Fprintf(h, "%d:%s\n", len(b), b)
		if m.Type == dockerfile.MountBind {
			src := m.Source
			if src == "" || src == "/" {
				src = "."
			}
			name, err := layer.CleanName(src, true)
			if err != nil {
				return nil, "", fmt.Errorf("%w: %s: source %q: %v", ErrInvalid, what, m.Source, err)
			}
			if name == "" {
				name = "."
			}
			exclude, err := bd.excluder(dockerfile.Step{}, true)
			if err != nil {
				return nil, "", err
			}
			if _, err := bd.ctxRoot.Lstat(name); err != nil || (name != "." && exclude(name, false)) {
				return nil, "", fmt.Errorf("%w: %s: source %q: no such file in the code package (or excluded by .dockerignore)", ErrInvalid, what, m.Source)
			}
			var sz treeSize
			if err := hashTree(ctx, h, bd.ctxRoot, name, exclude, &sz, bd.limits()); err != nil {
				return nil, "", fmt.Errorf("%s: %w", what, err)
			}
			p.source = name
		}
		plans = append(plans, p)
	}
	return plans, hex.EncodeToString(h.Sum(nil)), nil
}

// maxRunMounts bounds the --mount flags of one RUN (the VM gets a disk
// for each cache and bind).
const maxRunMounts = 8

func (bd *build) limits() layer.Limits {
	if bd.b.Limits == (layer.Limits{}) {
		return layer.DefaultImageLimits
	}
	return bd.b.Limits
}

// prepareMounts makes what the runner attaches: a bind's disk, a cache's
// disk (locked for the step). release unlocks and removes the step's own
// disks; call it after Run, whatever happened.
func (bd *build) prepareMounts(ctx context.Context, plans []mountPlan) (out []RunMount, release func(), err error) {
	var undo []func()
	release = func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	for _, p := range plans {
		rm := RunMount{Type: p.m.Type, Target: p.m.Target, ReadOnly: p.m.ReadOnly, Mode: p.m.Mode, UID: p.m.UID, GID: p.m.GID, SizeBytes: p.m.SizeBytes}
		switch p.m.Type {
		case dockerfile.MountTmpfs:
			rm.Name = "tmpfs"
		case dockerfile.MountBind:
			rm.Name = "bind of " + p.source
			disk, sub, err := bd.bindDisk(ctx, p.source)
			if err != nil {
				return nil, nil, fmt.Errorf("RUN --mount=type=bind,source=%s: %w", p.source, err)
			}
			undo = append(undo, func() { os.Remove(disk) })
			rm.Disk, rm.Sub = disk, sub
		case dockerfile.MountCache:
			rm.Name = "cache " + p.m.ID
			c, err := bd.openCacheMount(ctx, p.m)
			if err != nil {
				return nil, nil, fmt.Errorf("RUN --mount=type=cache,id=%s: %w", p.m.ID, err)
			}
			undo = append(undo, c.release)
			rm.Disk, rm.Fresh = c.disk, c.fresh
		}
		out = append(out, rm)
	}
	return out, release, nil
}

// bindDisk copies the context's source (after .dockerignore) into a new
// ext4 image and returns it, with the name the source has inside.
func (bd *build) bindDisk(ctx context.Context, name string) (disk, sub string, err error) {
	dir := bd.tmpName("bind")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", "", err
	}
	defer os.RemoveAll(dir)
	dr, err := os.OpenRoot(dir)
	if err != nil {
		return "", "", err
	}
	defer dr.Close()
	exclude, err := bd.excluder(dockerfile.Step{}, true)
	if err != nil {
		return "", "", err
	}
	fi, err := bd.ctxRoot.Stat(name)
	if err != nil {
		return "", "", err
	}
	// Below the file system's root, where mkfs puts lost+found.
	sub = "d"
	if !fi.IsDir() {
		sub = "f"
	}
	dst := sub
	opts := layer.CopyOptions{
		Options: layer.Options{Rootfs: true, Owner: &layer.Owner{}, Limits: bd.limits()},
		Exclude: func(rel string, isDir bool) bool { return exclude(path.Join(name, rel), isDir) },
	}
	if err := layer.CopyTree(ctx, bd.ctxRoot, name, dr, dst, opts); err != nil {
		return "", "", err
	}
	used, inodes, err := rootfs.DiskUsage(dir)
	if err != nil {
		return "", "", err
	}
	disk = bd.tmpName("bind") + ".ext4"
	if err := rootfs.BuildExt4(ctx, dir, disk, rootfs.AutoSize(used, inodes), "kiln-bind"); err != nil {
		return "", "", err
	}
	return disk, sub, nil
}

// cacheMount is an account's cache disk, locked for one step.
type cacheMount struct {
	disk    string
	fresh   bool
	release func()
}

// mountsDir is the account's folder of cache disks.
func mountsDir(dataDir, account string) string {
	return filepath.Join(dataDir, "image-cache", cacheMounts, ScopeName(account))
}

func (bd *build) cacheMountBytes() int64 {
	if bd.b.CacheMountBytes > 0 {
		return bd.b.CacheMountBytes
	}
	return DefaultCacheMountBytes
}

// openCacheMount locks the account's cache disk for id, making it if
// missing. sharing=shared and locked wait for a build of the same account
// that uses it (one ext4 image cannot be mounted by two VMs at once);
// private takes a fresh, throw-away disk instead of waiting.
func (bd *build) openCacheMount(ctx context.Context, m dockerfile.Mount) (*cacheMount, error) {
	dir := mountsDir(bd.b.DataDir, bd.req.Account)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte("kiln cache mount\x00" + m.ID))
	base := filepath.Join(dir, hex.EncodeToString(sum[:16]))
	lock, err := os.OpenFile(base+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	private := m.Sharing == dockerfile.SharingPrivate
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if !errors.Is(err, unix.EWOULDBLOCK) {
			lock.Close()
			return nil, err
		}
		if private {
			lock.Close()
			disk := bd.tmpName("cache") + ".ext4"
			if err := bd.newCacheDisk(ctx, disk); err != nil {
				return nil, err
			}
			bd.logf("  cache %s is in use by another build: this step gets an empty private one", m.ID)
			return &cacheMount{disk: disk, fresh: true, release: func() { os.Remove(disk) }}, nil
		}
		bd.logf("  waiting for cache %s (in use by another build of this account)", m.ID)
		if err := flockWait(ctx, lock); err != nil {
			lock.Close()
			return nil, err
		}
	}
	unlock := func() { lock.Close() } // closing drops the lock
	disk := base + ".ext4"
	fresh := false
	if _, err := os.Stat(disk); errors.Is(err, os.ErrNotExist) {
		bd.evictCacheMounts(dir, base)
		if err := bd.newCacheDisk(ctx, disk); err != nil {
			unlock()
			return nil, err
		}
		fresh = true
	} else if err != nil {
		unlock()
		return nil, err
	}
	// The time of last use, for PruneCache.
	now := time.Now()
	_ = os.Chtimes(disk, now, now)
	return &cacheMount{disk: disk, fresh: fresh, release: unlock}, nil
}

// flockWait takes the lock, giving up when ctx ends.
func flockWait(ctx context.Context, f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// newCacheDisk makes an empty, sparse ext4 image of the cache size.
func (bd *build) newCacheDisk(ctx context.Context, disk string) error {
	empty := bd.tmpName("empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		return err
	}
	defer os.Remove(empty)
	return rootfs.BuildExt4(ctx, empty, disk, bd.cacheMountBytes(), "kiln-cache")
}

// evictCacheMounts keeps the account under its number of caches: before
// a new one is made, the least recently used ones that no build holds go.
func (bd *build) evictCacheMounts(dir, keep string) {
	max := bd.b.MaxCacheMounts
	if max <= 0 {
		max = DefaultMaxCacheMounts
	}
	disks, _ := filepath.Glob(filepath.Join(dir, "*.ext4"))
	if len(disks) < max {
		return
	}
	type aged struct {
		base string
		t    time.Time
	}
	var all []aged
	for _, d := range disks {
		if fi, err := os.Stat(d); err == nil {
			all = append(all, aged{strings.TrimSuffix(d, ".ext4"), fi.ModTime()})
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].t.Before(all[j].t) })
	left := len(all)
	for i := 0; i < len(all) && left >= max; i++ {
		if all[i].base != keep && removeCacheMount(all[i].base) {
			left--
			bd.logf("  dropped the least recently used cache mount (this account keeps at most %d)", max)
		}
	}
}

// removeCacheMount removes a cache disk unless a build holds it.
func removeCacheMount(base string) bool {
	lock, err := os.OpenFile(base+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return false
	}
	defer lock.Close()
	if unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return false
	}
	if err := os.Remove(base + ".ext4"); err != nil {
		return false
	}
	// The lock file stays: removing it while another build opens it
	// would let two builds lock two different files.
	return true
}

// resetCacheMount empties a cache whose file system a guest could not
// mount: the next build starts it afresh.
func resetCacheMount(disk string) {
	os.Remove(disk)
}

// pruneCacheMounts removes an account folder's cache disks not used
// since cutoff that no build holds.
func pruneCacheMounts(dir string, cutoff time.Time) (removed int) {
	disks, _ := filepath.Glob(filepath.Join(dir, "*.ext4"))
	for _, d := range disks {
		fi, err := os.Stat(d)
		if err != nil || !fi.ModTime().Before(cutoff) {
			continue
		}
		if removeCacheMount(strings.TrimSuffix(d, ".ext4")) {
			removed++
		}
	}
	return removed
}
