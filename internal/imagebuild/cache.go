//go:build linux

package imagebuild

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/diskcopy"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// The template cache keeps one finished snapshot per key under
// CacheDir/accounts/SCOPE/KEY/{root.ext4,template/}, SCOPE being
// image.ScopeName of the account that built it. Templates never change
// after the snapshot (clones map the memory file read-only and write to
// their own overlays), so big files are shared by hard links, but only
// within an account: a memory snapshot holds the app's start-up state
// (secrets included), and sharing its pages across accounts would both
// hand it over and let one tenant learn another's inputs. The driver
// makes each copy (vmm.Driver.CopyTemplate), pointing its disk at the
// copy's own root disk: the template's files are the driver's business.

// cacheRecipe changes when the layout or what a template holds changes.
const cacheRecipe = "3" // 3: validate on a clone; capability sets

// templateKey covers the account too, though the account's folder already
// keeps entries apart: a key never stands for another account's template.
func templateKey(rootKey string, p vmm.Platform, argv, env []string, user, wd string, req Request, vcpus int) string {
	h := sha256.New()
	parts := []any{cacheRecipe, req.Account, rootKey, p, argv, env, user, wd, req.MemoryMiB, vcpus, req.Hooks, req.Egress, req.AllCaps}
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
	t, err := b.Driver.CopyTemplate(ctx, vmm.TemplateCopy{Src: filepath.Join(src, "template"), SrcRoot: filepath.Join(src, "root.ext4"), Dst: tmplDir, Root: rootDisk})
	if err != nil {
		return t, false, err
	}
	now := time.Now()
	_ = os.Chtimes(filepath.Join(src, "complete"), now, now)
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
	if err := diskcopy.LinkOrCopy(ctx, rootDisk, root); err != nil {
		return err
	}
	// The cached template is backed by the cache's own root disk path
	// (after the rename below). Cached templates are only copied from.
	if _, err := b.Driver.CopyTemplate(ctx, vmm.TemplateCopy{Src: tmplDir, SrcRoot: rootDisk, Dst: filepath.Join(tmp, "template"), Root: filepath.Join(dst, "root.ext4"), NoClone: true}); err != nil {
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
