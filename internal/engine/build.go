//go:build linux

package engine

import (
	"context"
	"fmt"
	"github.com/kiln-sandbox/kiln/internal/api"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// BuildImage implements api.Backend: each build runs on its own goroutine
// (builds of one version one after the other: they share the version's
// directory), its output streamed into the store's build log, and ends
// with Reporter.BuildFinished. The template location is recorded next to
// the build output (TemplateFor).
func (e *Engine) BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error {
	e.buildWG.Add(1)
	go func() {
		defer e.buildWG.Done()
		for _, b := range builds {
			e.build(v, b)
		}
	}()
	return nil
}

func (e *Engine) build(v store.ImageVersion, b store.Build) {
	ctx := e.ctx
	log := e.log.With("image", v.ImageName, "version", v.Version, "build", b.ID)
	rep := e.cfg.Reporter
	if err := rep.BuildRunning(ctx, b); err != nil {
		log.Warn("recording build start", "err", err)
		return
	}
	e.meterBuild(ctx, b, true)
	w := &storeLog{ctx: ctx, e: e, build: b.ID}
	buildStart := time.Now()
	finish := func(ok bool, reason string, snap *store.SnapshotBuild) {
		w.Close()
		result := "ok"
		if !ok {
			result = "failed"
		}
		metrics.Since(metrics.BuildDuration.WithLabelValues(result), buildStart)
		e.meterBuild(ctx, b, false)
		if err := rep.BuildFinished(context.WithoutCancel(ctx), b, ok, reason, snap); err != nil {
			log.Warn("recording build result", "err", err)
		}
	}
	if e.cfg.Builder == nil {
		finish(false, "BuildFailed: this kiln server has no image builder", nil)
		return
	}
	dir := e.imageDir(v.Account, v.ImageName, v.Version)
	out := filepath.Join(dir, "build-"+safe(b.ID))
	os.RemoveAll(out) // a build interrupted by a restart starts over
	if err := os.MkdirAll(out, 0o700); err != nil {
		finish(false, "BuildFailed: "+err.Error(), nil)
		return
	}
	start := time.Now()
	res, err := e.cfg.Builder.Build(ctx, BuildRequest{Version: v, Build: b, OutDir: out, Log: w})
	if ctx.Err() != nil {
		return // shutting down: recovery runs the build again
	}
	if err != nil {
		log.Warn("build failed", "err", err)
		fmt.Fprintf(w, "\nbuild failed: %v\n", err)
		finish(false, "BuildFailed: "+err.Error(), nil)
		return
	}
	// Durable before recorded: every file and directory of the build's
	// output (the template and the disks it is backed by) and of the
	// template, wherever the builder put it.
	if err := syncTree(out); err != nil {
		finish(false, "BuildFailed: flushing the template to disk: "+err.Error(), nil)
		return
	}
	if !strings.HasPrefix(res.TemplateDir, out+string(filepath.Separator)) {
		if err := syncTree(res.TemplateDir); err != nil {
			finish(false, "BuildFailed: flushing the template to disk: "+err.Error(), nil)
			return
		}
	}
	if err := e.SetTemplate(v.Account, v.ImageName, v.Version, res.TemplateDir); err != nil {
		finish(false, "BuildFailed: recording the template: "+err.Error(), nil)
		return
	}
	log.Info("build finished", "took", time.Since(start).Round(time.Second), "template", res.TemplateDir)
	finish(true, "", res.Snapshot)
}

// syncTree fsyncs every regular file and directory under root, root
// itself and its parent (which holds root's name).
func syncTree(root string) error {
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil
		}
		return syncPath(p)
	})
	if err != nil {
		return err
	}
	return syncPath(filepath.Dir(root))
}

func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", p, err)
	}
	return nil
}

// storeLog streams build output into the store, in chunks of at most
// 64 KiB, so `kiln logs` shows progress as it happens. A build's commands
// write it (a RUN can print without end), so it keeps at most
// maxBuildLog bytes and then one line saying the rest was dropped.
type storeLog struct {
	ctx     context.Context
	e       *Engine
	build   string
	mu      sync.Mutex
	written int64
	full    bool
}

// maxBuildLog bounds what one build writes into the store.
const maxBuildLog = 16 << 20

func (l *storeLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.full {
		return len(p), nil
	}
	q := p
	if room := maxBuildLog - l.written; int64(len(q)) > room {
		q = q[:room]
		l.full = true
	}
	for off := 0; off < len(q); off += 64 << 10 {
		end := min(off+64<<10, len(q))
		if err := l.e.cfg.Reporter.AppendBuildLog(context.WithoutCancel(l.ctx), l.build, q[off:end]); err != nil {
			return off, err
		}
		l.written += int64(end - off)
	}
	if l.full {
		msg := fmt.Sprintf("\n(build log over %d MiB: the rest of the output is dropped)\n", maxBuildLog>>20)
		_ = l.e.cfg.Reporter.AppendBuildLog(context.WithoutCancel(l.ctx), l.build, []byte(msg))
	}
	return len(p), nil
}

func (l *storeLog) Close() error { return nil }

func (e *Engine) recoverBuilds(ctx context.Context, builds []store.Build) error {
	return api.RedoBuilds(ctx, e.cfg.Store, builds, e.BuildImage)
}

// DeleteImageVersion implements api.Backend: the version's files go, unless
// microVMs still run from its template (their disks sit on it); then the
// last of them to terminate removes them (gcTemplate).
func (e *Engine) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	e.gcTemplate(ctx, account, image, version)
	return nil
}

// gcTemplate removes a version's files when its record is gone and no
// microVM that is not terminated uses it.
func (e *Engine) gcTemplate(ctx context.Context, account, image, version string) {
	if image == "" || version == "" {
		return
	}
	ctx = context.WithoutCancel(ctx)
	if _, err := e.cfg.Store.GetImageVersion(ctx, account, image, version); err == nil {
		return // still a live version
	}
	ms, _, err := e.cfg.Store.ListMicrovms(ctx, account, store.MicrovmFilter{ImageName: image, ImageVersion: version,
		States: []store.MicrovmState{store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating}}, store.Page{Limit: 1000})
	if err != nil {
		e.log.Warn("checking template users", "image", image, "version", version, "err", err)
		return
	}
	for _, m := range ms {
		if !m.State.Final() && e.lookup(m.ID) != nil {
			return
		}
	}
	dir := e.imageDir(account, image, version)
	if tmpl, err := e.TemplateFor(account, image, version); err == nil && !strings.HasPrefix(tmpl, dir+string(filepath.Separator)) {
		// A template kept outside the version's directory (an imported one)
		// is not ours to remove.
		e.log.Debug("leaving template outside the data dir", "template", tmpl)
	}
	if err := os.RemoveAll(dir); err != nil {
		e.log.Warn("removing image version files", "dir", dir, "err", err)
		return
	}
	e.log.Info("removed image version files", "image", image, "version", version)
}
