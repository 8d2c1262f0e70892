// Package gc is kiln's garbage collector. One pass (Collector.Run), at
// start and then every --gc-interval:
//
//   - prunes build caches (image-cache, template-cache) of entries unused
//     for CacheMaxAge; no image version references a cache entry by path
//     (a version's template is a hard-linked copy), so age is the rule;
//   - removes uploaded code artifacts that no image version names, once
//     older than ArtifactGrace (an upload comes before the CreateMicrovmImage
//     that names it): files, and a cluster's uploads in the store;
//   - removes E2B template files (the SDK's uploads of a template's COPY
//     files) unused for TemplateFilesMaxAge: a use (the SDK's files check
//     answering present, a build reading them) renews their time, so a
//     tenant at its bound of kept files frees it by waiting; files on one
//     host, and a cluster's in the store;
//   - deletes TERMINATED microVM records and idempotency tokens older than
//     TerminatedRetention;
//   - sweeps orphans both ways: image version directories with no record
//     and no microVM using them, VMs and VM networks with no live record
//     (Engine.SweepVMs); and records whose files are gone: a SUCCESSFUL
//     version whose template vanished becomes FAILED, a SUSPENDED microVM
//     whose memory file vanished becomes TERMINATED, each with the reason;
//     and an IN_PROGRESS version none of whose builds is still unfinished,
//     untouched for StuckAfter (a snapshot kiln stopped in the middle of:
//     nothing will finish it), becomes FAILED.
//
// GC never removes what is referenced. Records that own files are written
// before the files exist, and References orders the API's writes of new
// references (image versions, uploads, a use of template files) against
// the collector's decide-and-remove section, so a reference recorded after
// GC listed the records cannot point at a file GC is removing. In the
// store, where other hosts write without this process's References, each
// delete is conditional on the row's time, which a put or use renews.
package gc

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// References orders new references against collection. Whoever records a
// reference to a file GC may remove (an image version naming a code
// artifact or owning an image directory; an upload placing an artifact;
// a use of template files renewing their time) holds it, shared, across the write; GC holds it alone while it decides
// and removes. The zero value is ready; a nil *References holds nothing.
type References struct{ mu sync.RWMutex }

// Hold takes the shared side; call the returned func when the reference
// is durable.
func (r *References) Hold() (release func()) {
	if r == nil {
		return func() {}
	}
	r.mu.RLock()
	return r.mu.RUnlock
}

func (r *References) exclusive() (release func()) {
	if r == nil {
		return func() {}
	}
	r.mu.Lock()
	return r.mu.Unlock
}

// testHookListed runs between reading the records and judging the
// files (tests widen the window there).
var testHookListed func()

// Engine is what GC needs of the VM engine (internal/engine satisfies it).
type Engine interface {
	// ImageDir is where an image version's files live.
	ImageDir(account, image, version string) string
	// TemplateFor is the template directory recorded for a version.
	TemplateFor(account, image, version string) (string, error)
	// SweepVMs removes VMs and VM networks of microVMs that no live record
	// or operation in flight claims, and returns what it removed.
	SweepVMs(ctx context.Context) ([]string, error)
	// SweepSuspended ends SUSPENDED microVMs whose saved memory or disk is
	// gone (TERMINATED, reason named) and returns their ids.
	SweepSuspended(ctx context.Context) ([]string, error)
}

// Config configures a Collector.
type Config struct {
	Store   store.Store
	DataDir string
	// Engine is nil for a server that runs no VMs.
	Engine     Engine
	References *References
	// TerminatedRetention keeps TERMINATED records and tokens (default 24h).
	TerminatedRetention time.Duration
	// CacheMaxAge keeps unused cache entries (default 7 days).
	CacheMaxAge time.Duration
	// ArtifactGrace keeps unreferenced uploads at least this long
	// (default 1h).
	ArtifactGrace time.Duration
	// TemplateFilesDir holds one host's E2B template files
	// (e2b.FilesDir: ACCOUNT/HASH.tar; "": none); TemplateFilesMaxAge
	// keeps them, and the store's (store.TemplateFiles), while unused
	// (default 7 days).
	TemplateFilesDir    string
	TemplateFilesMaxAge time.Duration
	// PruneImageCache and PruneTemplateCache prune the build caches
	// (internal/image.PruneCache, internal/imagebuild.PruneTemplateCache);
	// nil skips.
	PruneImageCache    func(maxAge time.Duration) (int, error)
	PruneTemplateCache func(maxAge time.Duration) (int, error)
	Log                *slog.Logger
	Now                func() time.Time
}

// Collector runs garbage collection passes; one at a time.
type Collector struct {
	cfg Config
	run sync.Mutex
}

// New returns a Collector with defaults filled in.
func New(cfg Config) *Collector {
	if cfg.TerminatedRetention <= 0 {
		cfg.TerminatedRetention = 24 * time.Hour
	}
	if cfg.CacheMaxAge <= 0 {
		cfg.CacheMaxAge = 7 * 24 * time.Hour
	}
	if cfg.ArtifactGrace <= 0 {
		cfg.ArtifactGrace = time.Hour
	}
	if cfg.TemplateFilesMaxAge <= 0 {
		cfg.TemplateFilesMaxAge = DefaultTemplateFilesMaxAge
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Collector{cfg: cfg}
}

// Report says what one pass removed or ended, by kind.
type Report map[string]int

// DefaultTemplateFilesMaxAge keeps unused E2B template files as long as
// unused build cache entries.
const DefaultTemplateFilesMaxAge = 7 * 24 * time.Hour

// Kinds of Report and of kiln_gc_removals_total.
const (
	KindImageCache       = "image_cache"
	KindTemplateCache    = "template_cache"
	KindArtifact         = "artifact"
	KindTerminated       = "terminated_record"
	KindClientToken      = "client_token"
	KindVersionDir       = "image_version_dir"
	KindVM               = "vm_or_network"
	KindVersionFailed    = "version_files_gone"
	KindSuspendedEnded   = "suspended_files_gone"
	KindTemplateFiles    = "template_files"
	KindVersionStuck     = "version_interrupted"
	ReasonTemplateGone   = "TemplateMissing"
	ReasonInterrupted    = "Interrupted"
	artifactUploadMaxAge = 24 * time.Hour
)

func (r Report) add(kind string, n int) {
	if n > 0 {
		r[kind] += n
		metrics.GCRemovals.WithLabelValues(kind).Add(float64(n))
	}
}

// Loop runs a pass now and then every interval until ctx ends.
func (c *Collector) Loop(ctx context.Context, interval time.Duration) {
	for {
		if rep, err := c.Run(ctx); err != nil && ctx.Err() == nil {
			c.cfg.Log.Warn("garbage collection", "removed", rep, "err", err)
		} else if len(rep) > 0 {
			c.cfg.Log.Info("garbage collection", "removed", rep)
		}
		if interval <= 0 {
			return
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// Run performs one pass. Every step runs even if an earlier one failed;
// the errors are joined.
func (c *Collector) Run(ctx context.Context) (Report, error) {
	c.run.Lock()
	defer c.run.Unlock()
	rep := Report{}
	var errs []error
	step := func(what string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		}
	}
	now := c.cfg.Now()
	if f := c.cfg.PruneImageCache; f != nil {
		n, err := f(c.cfg.CacheMaxAge)
		rep.add(KindImageCache, n)
		step("pruning the image cache", err)
	}
	if f := c.cfg.PruneTemplateCache; f != nil {
		n, err := f(c.cfg.CacheMaxAge)
		rep.add(KindTemplateCache, n)
		step("pruning the template cache", err)
	}
	n, err := c.cfg.Store.DeleteTerminatedMicrovms(ctx, now.Add(-c.cfg.TerminatedRetention))
	rep.add(KindTerminated, n)
	step("deleting terminated microvms", err)
	n, err = c.cfg.Store.DeleteClientTokens(ctx, now.Add(-c.cfg.TerminatedRetention))
	rep.add(KindClientToken, n)
	step("deleting client tokens", err)

	step("sweeping files", c.sweepFiles(ctx, rep, now))
	// The record checks below judge each version again before they change it.
	versions, err := allVersions(ctx, c.cfg.Store)
	step("listing image versions", err)
	step("failing interrupted image versions", c.failStuckVersions(ctx, versions, rep, now))
	step("expiring template files", c.expireTemplateFiles(ctx, rep, now))
	if e := c.cfg.Engine; e != nil {
		ids, err := e.SweepVMs(ctx)
		rep.add(KindVM, len(ids))
		step("sweeping vms", err)
		ids, err = e.SweepSuspended(ctx)
		rep.add(KindSuspendedEnded, len(ids))
		step("checking suspended microvms", err)
		step("checking image versions", c.checkVersions(ctx, versions, rep))
	}
	return rep, errors.Join(errs...)
}

// sweepFiles removes artifacts and image version directories nothing
// references, deciding and removing while no new reference can be made.
func (c *Collector) sweepFiles(ctx context.Context, rep Report, now time.Time) error {
	release := c.cfg.References.exclusive()
	defer release()
	versions, err := allVersions(ctx, c.cfg.Store)
	if err != nil {
		return err
	}
	if testHookListed != nil {
		testHookListed()
	}
	artifacts := map[string]bool{}
	uploads := map[string]bool{} // kiln-upload:// URIs
	dirs := map[string]bool{}
	for _, v := range versions {
		if a := v.Config.CodeArtifact; a != nil {
			if p := localPath(a.URI); p != "" {
				artifacts[p] = true
			}
			uploads[a.URI] = true
		}
		if c.cfg.Engine != nil {
			dirs[filepath.Clean(c.cfg.Engine.ImageDir(v.Account, v.ImageName, v.Version))] = true
		}
	}
	var errs []error
	n, err := c.sweepArtifacts(artifacts, now)
	rep.add(KindArtifact, n)
	errs = append(errs, err)
	n, err = c.sweepUploads(ctx, uploads, now)
	rep.add(KindArtifact, n)
	errs = append(errs, err)
	if c.cfg.Engine != nil {
		// Deleted versions whose microVMs still run keep their files.
		vms, err := c.cfg.Store.ListMicrovmsInState(ctx, 0, store.StatePending, store.StateRunning,
			store.StateSuspending, store.StateSuspended, store.StateTerminating)
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		for _, m := range vms {
			dirs[filepath.Clean(c.cfg.Engine.ImageDir(m.Account, m.ImageName, m.ImageVersion))] = true
		}
		n, err := c.sweepVersionDirs(dirs)
		rep.add(KindVersionDir, n)
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func allVersions(ctx context.Context, st store.Store) ([]store.ImageVersion, error) {
	var out []store.ImageVersion
	p := store.Page{Limit: 1000}
	for {
		vs, next, err := st.ListAllImageVersions(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("listing image versions: %w", err)
		}
		out = append(out, vs...)
		if next == "" {
			return out, nil
		}
		p.Token = next
	}
}

// localPath is the cleaned absolute file path of a file:// or bare-path
// URI, or "".
func localPath(uri string) string {
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "file" && u.Scheme != "") || u.Host != "" {
		return ""
	}
	if !filepath.IsAbs(u.Path) {
		return "" // uploads are named by absolute paths; nothing else is ours
	}
	return filepath.Clean(u.Path)
}

// sweepArtifacts removes DATA_DIR/artifacts/ACCOUNT/*.zip that no version
// names and that are older than the grace, and abandoned partial uploads.
func (c *Collector) sweepArtifacts(referenced map[string]bool, now time.Time) (int, error) {
	root, err := filepath.Abs(filepath.Join(c.cfg.DataDir, "artifacts"))
	if err != nil {
		return 0, err
	}
	return c.sweepAccountFiles(root, now, "gc: removed unreferenced code artifact", func(p string, fi fs.FileInfo) bool {
		return !referenced[p] && now.Sub(fi.ModTime()) >= c.cfg.ArtifactGrace
	})
}

// sweepAccountFiles removes ROOT/ACCOUNT/NAME when expired says so, and
// the .upload-* files of puts that died midway, logging each with msg.
func (c *Collector) sweepAccountFiles(root string, now time.Time, msg string, expired func(p string, fi fs.FileInfo) bool) (int, error) {
	accounts, err := os.ReadDir(root)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	removed := 0
	for _, a := range accounts {
		if !a.IsDir() {
			continue
		}
		dir := filepath.Join(root, a.Name())
		files, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, f := range files {
			p := filepath.Join(dir, f.Name())
			fi, err := os.Lstat(p)
			if err != nil {
				continue
			}
			if strings.HasPrefix(f.Name(), ".upload-") {
				if now.Sub(fi.ModTime()) < artifactUploadMaxAge {
					continue
				}
			} else if !expired(p, fi) {
				continue
			}
			if err := os.RemoveAll(p); err == nil {
				removed++
				c.cfg.Log.Info(msg, "path", p, "modified", fi.ModTime().UTC())
			}
		}
	}
	return removed, nil
}

// sweepUploads is sweepArtifacts for the uploads a cluster keeps in the
// store (store.Uploads), which other hosts' APIs write without this
// process's References: the delete is conditional on the upload's time,
// which a new put of it or an image version about to name it renews
// (api claimUpload), so only what nobody touched within the grace goes.
func (c *Collector) sweepUploads(ctx context.Context, referenced map[string]bool, now time.Time) (int, error) {
	st, ok := c.cfg.Store.(store.Uploads)
	if !ok {
		return 0, nil
	}
	ups, err := st.ListUploads(ctx, "")
	if err != nil {
		return 0, err
	}
	removed := 0
	var errs []error
	for _, u := range ups {
		if referenced[u.URI()] || now.Sub(u.CreatedAt) < c.cfg.ArtifactGrace {
			continue
		}
		ok, err := st.DeleteUpload(ctx, u.Account, u.SHA256, now.Add(-c.cfg.ArtifactGrace))
		if err != nil {
			errs = append(errs, err)
		} else if ok {
			removed++
			c.cfg.Log.Info("gc: removed unreferenced upload", "uri", u.URI())
		}
	}
	// Chunks of puts that died midway (a put takes minutes at most).
	if n, err := st.PruneUploadChunks(ctx, now.Add(-artifactUploadMaxAge)); err != nil {
		errs = append(errs, err)
	} else if n > 0 {
		c.cfg.Log.Info("gc: removed chunks of abandoned uploads", "chunks", n)
	}
	return removed, errors.Join(errs...)
}

// expireTemplateFiles removes E2B template files unused for
// TemplateFilesMaxAge: one host's, while no use can renew them, and the
// store's, each delete conditional on the time it judged.
func (c *Collector) expireTemplateFiles(ctx context.Context, rep Report, now time.Time) error {
	cut := now.Add(-c.cfg.TemplateFilesMaxAge)
	var errs []error
	if c.cfg.TemplateFilesDir != "" {
		release := c.cfg.References.exclusive()
		n, err := c.sweepTemplateDir(now, cut)
		release()
		rep.add(KindTemplateFiles, n)
		errs = append(errs, err)
	}
	if st, ok := c.cfg.Store.(store.TemplateFiles); ok {
		n, err := c.sweepStoredTemplateFiles(ctx, st, cut)
		rep.add(KindTemplateFiles, n)
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// sweepTemplateDir removes TemplateFilesDir/ACCOUNT/HASH.tar last put or
// used (their mtime) before cut.
func (c *Collector) sweepTemplateDir(now, cut time.Time) (int, error) {
	return c.sweepAccountFiles(c.cfg.TemplateFilesDir, now, "gc: removed unused template files", func(p string, fi fs.FileInfo) bool {
		return strings.HasSuffix(p, ".tar") && fi.ModTime().Before(cut)
	})
}

// sweepStoredTemplateFiles is sweepTemplateDir for the files a cluster
// keeps in the store; a put or use on another replica after the list
// renews the row's time, so its delete does nothing.
func (c *Collector) sweepStoredTemplateFiles(ctx context.Context, st store.TemplateFiles, cut time.Time) (int, error) {
	files, err := st.ListTemplateFiles(ctx, "")
	if err != nil {
		return 0, err
	}
	removed := 0
	var errs []error
	for _, f := range files {
		if !f.CreatedAt.Before(cut) {
			continue
		}
		ok, err := st.DeleteTemplateFile(ctx, f.Account, f.Hash, cut)
		if err != nil {
			errs = append(errs, err)
		} else if ok {
			removed++
			c.cfg.Log.Info("gc: removed unused template files", "account", f.Account, "hash", f.Hash, "last_used", f.CreatedAt)
		}
	}
	return removed, errors.Join(errs...)
}

// sweepVersionDirs removes DATA_DIR/images/A/I/V directories that no
// version record and no live microVM owns.
func (c *Collector) sweepVersionDirs(owned map[string]bool) (int, error) {
	root := filepath.Join(c.cfg.DataDir, "images")
	removed := 0
	accounts, err := os.ReadDir(root)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	for _, a := range accounts {
		images, _ := os.ReadDir(filepath.Join(root, a.Name()))
		for _, i := range images {
			vdir := filepath.Join(root, a.Name(), i.Name())
			versions, _ := os.ReadDir(vdir)
			for _, v := range versions {
				p := filepath.Clean(filepath.Join(vdir, v.Name()))
				if owned[p] {
					continue
				}
				if err := os.RemoveAll(p); err == nil {
					removed++
					c.cfg.Log.Info("gc: removed image version files with no record", "dir", p)
				}
			}
			// The account's and image's folders stay even when empty: a
			// build making its version's folder (MkdirAll, after its
			// record) must never find a parent gone half-way.
		}
	}
	return removed, nil
}

// StuckAfter is how long an IN_PROGRESS version without an unfinished
// build may stay so before failStuckVersions fails it. A snapshot
// records its version and a SUCCESSFUL build, copies, then marks the
// version SUCCESSFUL; kiln stopping in between leaves it IN_PROGRESS
// for good (a build's recovery redoes unfinished builds, and this one
// looks finished). The copy takes seconds to minutes, so an hour without
// a change leaves another control replica's snapshot alone.
const StuckAfter = time.Hour

// failStuckVersions marks FAILED (its image CREATE_FAILED or
// UPDATE_FAILED) every version left IN_PROGRESS with nothing to finish
// it, so the user sees why and deletes it; what it recorded counts toward
// the storage quota until then, as its files take room until then.
func (c *Collector) failStuckVersions(ctx context.Context, versions []store.ImageVersion, rep Report, now time.Time) error {
	var errs []error
	for _, v := range versions {
		if v.State != store.VersionInProgress || now.Sub(v.UpdatedAt) < StuckAfter {
			continue
		}
		builds, _, err := c.cfg.Store.ListBuilds(ctx, v.Account, v.ImageName, v.Version, store.Page{Limit: 100})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if slices.ContainsFunc(builds, func(b store.Build) bool { return !store.BuildFinal(b.State) }) {
			continue
		}
		// Read again: a version finished or deleted meanwhile stays so.
		cur, err := c.cfg.Store.GetImageVersion(ctx, v.Account, v.ImageName, v.Version)
		if errors.Is(err, errdefs.ErrNotFound) || err == nil && (cur.State != store.VersionInProgress || !cur.UpdatedAt.Equal(v.UpdatedAt)) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cur.State = store.VersionFailed
		cur.StateReason = ReasonInterrupted + ": kiln stopped while making this version (a snapshot's copy), and nothing will finish it; delete it and make it again"
		cur.UpdatedAt = now.UTC()
		if err := c.cfg.Store.UpdateImageVersion(ctx, cur); err != nil {
			if !errors.Is(err, errdefs.ErrNotFound) {
				errs = append(errs, err)
			}
			continue
		}
		rep.add(KindVersionStuck, 1)
		c.cfg.Log.Warn("gc: image version left in progress with nothing to finish it: marked FAILED", "account", v.Account, "image", v.ImageName, "version", v.Version, "since", v.UpdatedAt)
	}
	return errors.Join(errs...)
}

// checkVersions fails SUCCESSFUL versions whose template is gone.
func (c *Collector) checkVersions(ctx context.Context, versions []store.ImageVersion, rep Report) error {
	var errs []error
	for _, v := range versions {
		if v.State != store.VersionSuccessful {
			continue
		}
		tmpl, err := c.cfg.Engine.TemplateFor(v.Account, v.ImageName, v.Version)
		why := ""
		if err != nil {
			why = "no template is recorded on this host"
		} else if _, err := os.Stat(filepath.Join(tmpl, "template.json")); err != nil {
			why = "its snapshot template " + tmpl + " is gone"
		}
		if why == "" {
			continue
		}
		// Read again: a version deleted meanwhile stays deleted.
		cur, err := c.cfg.Store.GetImageVersion(ctx, v.Account, v.ImageName, v.Version)
		if errors.Is(err, errdefs.ErrNotFound) || (err == nil && cur.State != store.VersionSuccessful) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cur.State = store.VersionFailed
		cur.StateReason = ReasonTemplateGone + ": " + why + "; create a new version of the image"
		cur.UpdatedAt = c.cfg.Now().UTC()
		if err := c.cfg.Store.UpdateImageVersion(ctx, cur); err != nil {
			if !errors.Is(err, errdefs.ErrNotFound) {
				errs = append(errs, err)
			}
			continue
		}
		rep.add(KindVersionFailed, 1)
		c.cfg.Log.Warn("gc: image version's files are gone: marked FAILED", "account", v.Account, "image", v.ImageName, "version", v.Version, "why", why)
	}
	return errors.Join(errs...)
}
