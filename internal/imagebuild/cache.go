//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// The template cache keeps one finished snapshot per key under
// CacheDir/accounts/SCOPE/KEY/{root.ext4,template/}, SCOPE being
// image.ScopeName of the account that built it. Templates never change
// after the snapshot (clones map the memory file read-only and write to
// their own overlays), so big files are shared by hard links, but only
// within an account: a memory snapshot holds the app's start-up state
// (secrets included), and sharing its pages across accounts would both
// hand it over and let one tenant learn another's inputs. Two files name
// absolute paths and are rewritten per copy: disk.qcow2's backing file
// (the root disk) and overlay.qcow2's (disk.qcow2).

// cacheRecipe changes when the layout or what a template holds changes.
const cacheRecipe = "2"

// templateKey covers the account too, though the account's folder already
// keeps entries apart: a key never stands for another account's template.
func templateKey(rootKey string, p vmm.Platform, argv, env []string, user, wd string, req Request, vcpus int) string {
	h := sha256.New()
	parts := []any{cacheRecipe, req.Account, rootKey, p, argv, env, user, wd, req.MemoryMiB, vcpus, req.Hooks, req.Egress}
	for _, x := range parts {
		b, _ := json.Marshal(x)
		fmt.Fprintf(h, "%d:%s\n", len(b), b)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// accountCacheDir is the account's own part of the template cache.
func (b *Builder) accountCacheDir(account string) string {
	return filepath.Join(b.CacheDir, "accounts", image.ScopeName(account))
}

// fromCache puts the account's cached template for key into tmplDir,
// backed by rootDisk.
func (b *Builder) fromCache(ctx context.Context, account, key, rootDisk, tmplDir string) (vmm.Template, bool, error) {
	src := filepath.Join(b.accountCacheDir(account), key)
	if _, err := os.Stat(filepath.Join(src, "complete")); err != nil {
		return vmm.Template{}, false, nil
	}
	var t vmm.Template
	raw, err := os.ReadFile(filepath.Join(src, "template", "template.json"))
	if err != nil {
		return t, false, err
	}
	if err := json.Unmarshal(raw, &t); err != nil {
		return t, false, err
	}
	if err := copyTemplate(ctx, filepath.Join(src, "template"), filepath.Join(src, "root.ext4"), tmplDir, rootDisk, true); err != nil {
		os.RemoveAll(tmplDir)
		return t, false, err
	}
	now := time.Now()
	_ = os.Chtimes(filepath.Join(src, "complete"), now, now)
	t.Dir = tmplDir
	return t, true, nil
}

// toCache stores a finished template under the account's key (first
// writer wins).
func (b *Builder) toCache(ctx context.Context, account, key, rootDisk, tmplDir string) error {
	dir := b.accountCacheDir(account)
	dst := filepath.Join(dir, key)
	if _, err := os.Stat(filepath.Join(dst, "complete")); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(dir, ".tmp-"+key[:12]+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root.ext4")
	if err := linkOrCopy(ctx, rootDisk, root); err != nil {
		return err
	}
	// The cached template is backed by the cache's own root disk path. It
	// has no clone overlay: cached templates are only copied from.
	if err := copyTemplate(ctx, tmplDir, rootDisk, filepath.Join(tmp, "template"), filepath.Join(dst, "root.ext4"), false); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "complete"), nil, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		if _, serr := os.Stat(filepath.Join(dst, "complete")); serr == nil {
			return nil // another build stored it first
		}
		return err
	}
	return nil
}

// copyTemplate makes dst a template equal to src (whose disk is backed by
// srcRoot) with its disk backed by rootDisk (which need not exist yet).
// The template's disk.qcow2 was written by a VM's QEMU: its chain is
// checked to be exactly disk.qcow2 <- srcRoot first, qemu-img touches it
// only confined and through a descriptor, and the clone overlay is made
// without opening it.
func copyTemplate(ctx context.Context, src, srcRoot, dst, rootDisk string, withOverlay bool) error {
	srcRoot, err := filepath.Abs(srcRoot)
	if err != nil {
		return err
	}
	if rootDisk, err = filepath.Abs(rootDisk); err != nil {
		return err
	}
	if err := qcow2.CheckChain([]string{filepath.Join(src, "disk.qcow2"), srcRoot}); err != nil {
		return fmt.Errorf("copying template %s: %w", src, err)
	}
	// QEMU reads a relative backing name from the overlay's own folder.
	if dst, err = filepath.Abs(dst); err != nil {
		return err
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		switch f := e.Name(); {
		case f == "disk.qcow2" || f == "overlay.qcow2" || f == chainFile:
			// Made below: they name absolute paths.
		case !e.Type().IsRegular():
			return fmt.Errorf("template %s holds %s, which is not a file", src, f)
		default:
			if err := linkOrCopy(ctx, filepath.Join(src, f), filepath.Join(dst, f)); err != nil {
				return err
			}
		}
	}
	disk := filepath.Join(dst, "disk.qcow2")
	if err := run(ctx, "cp", "--sparse=always", "--reflink=auto", filepath.Join(src, "disk.qcow2"), disk); err != nil {
		return err
	}
	// -u: only the header changes; the backing file's content is the same.
	if err := rebaseHeader(ctx, disk, rootDisk); err != nil {
		return err
	}
	h, err := qcow2.ParseFile(disk)
	if err != nil {
		return err
	}
	if h.BackingFile != rootDisk || h.BackingFormat != "raw" {
		return fmt.Errorf("rebasing %s: header names %q (%s), expected %q (raw)", disk, h.BackingFile, h.BackingFormat, rootDisk)
	}
	// The driver hands QEMU this chain from descriptors (vmm/qemu reads
	// chain.json); the copy's is its own disk on rootDisk.
	chain, _ := json.MarshalIndent([]chainLayer{{Path: disk, Format: "qcow2"}, {Path: rootDisk, Format: "raw"}}, "", "  ")
	if err := os.WriteFile(filepath.Join(dst, chainFile), chain, 0o600); err != nil {
		return err
	}
	if !withOverlay {
		return nil
	}
	// -u and the size from the checked header: qemu-img opens neither the
	// disk nor its backing file.
	return run(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", disk, "-F", "qcow2", filepath.Join(dst, "overlay.qcow2"), strconv.FormatUint(h.Size, 10))
}

// chainFile records a template's disk chain, top first, in the shape the
// QEMU driver reads (vmm/qemu chain.go).
const chainFile = "chain.json"

type chainLayer struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// rebaseHeader points the qcow2 image's header at backing (raw) without
// reading either, with qemu-img confined and given the image as a
// descriptor, opened without its old backing file.
func rebaseHeader(ctx context.Context, image, backing string) error {
	f, err := hosttool.Open(image, true)
	if err != nil {
		return err
	}
	defer f.Close()
	var out bytes.Buffer
	cmd, err := hosttool.Command(ctx, hosttool.Spec{
		Path: "qemu-img", Files: []*os.File{f}, Stdout: &limitedWriter{w: &out, n: 64 << 10}, Stderr: &limitedWriter{w: &out, n: 64 << 10},
		Args: []string{"rebase", "-q", "-u", "-F", "raw", "-b", backing, qcow2.OpenSpec([]string{hosttool.FD(0)}, "qcow2")},
	})
	if err != nil {
		return err
	}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("qemu-img rebase %s: %s: %w", image, strings.TrimSpace(out.String()), err)
	}
	return nil
}

func linkOrCopy(ctx context.Context, src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return run(ctx, "cp", "--sparse=always", "--reflink=auto", src, dst)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %s: %w", name, strings.Join(args, " "), strings.TrimSpace(string(out)), err)
	}
	return nil
}

// PruneTemplateCache removes cached templates not used for maxAge (a
// reuse refreshes an entry's time) and half-written entries older than an
// hour, in every account's folder. Entries of the unscoped layout of older
// versions (CacheDir/KEY) are removed whatever their age: nothing says
// which account made them. Versions made from an entry keep working: their
// files are hard links or copies.
func PruneTemplateCache(dir string, maxAge time.Duration) (removed int, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if e.Name() != "accounts" {
			if err := os.RemoveAll(p); err == nil {
				removed++
			}
			continue
		}
		scopes, err := os.ReadDir(p)
		if err != nil {
			return removed, err
		}
		for _, sc := range scopes {
			removed += pruneTemplates(filepath.Join(p, sc.Name()), maxAge)
		}
	}
	return removed, nil
}

func pruneTemplates(dir string, maxAge time.Duration) (removed int) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	now := time.Now()
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		stamp := filepath.Join(p, "complete")
		age := maxAge
		if strings.HasPrefix(e.Name(), ".tmp-") {
			stamp, age = p, time.Hour
		}
		fi, err := os.Stat(stamp)
		if err != nil && !os.IsNotExist(err) {
			continue
		}
		if err == nil && now.Sub(fi.ModTime()) < age {
			continue
		}
		if err := os.RemoveAll(p); err == nil {
			removed++
		}
	}
	return removed
}
