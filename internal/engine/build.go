//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// BuildImage implements lifecycle.Backend: the builds of a version run one
// after the other (they share the version's directory) on a goroutine of
// their own, each once it gets one of MaxConcurrentBuilds slots (it says
// so in its log while it waits), within BuildTimeout, with its host memory
// reserved, its output batched into the store's build log up to
// BuildLogMaxBytes, and ends with Reporter.BuildFinished. The template
// location is recorded next to the build output (TemplateFor). Deleting
// the version (DeleteImageVersion) cancels it.
func (e *Engine) BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error {
	key := versionKey(v.Account, v.ImageName, v.Version)
	run := &buildRun{done: make(chan struct{})}
	run.ctx, run.cancel = context.WithCancel(e.ctx)
	e.buildMu.Lock()
	if old := e.builds[key]; old != nil {
		// A redo (recovery) of a version already building: keep the first.
		e.buildMu.Unlock()
		run.cancel()
		return nil
	}
	e.builds[key] = run
	e.buildMu.Unlock()
	e.buildWG.Add(1)
	go func() {
		defer e.buildWG.Done()
		defer func() {
			e.buildMu.Lock()
			delete(e.builds, key)
			e.buildMu.Unlock()
			run.cancel()
			close(run.done)
		}()
		for _, b := range builds {
			if run.ctx.Err() != nil {
				return
			}
			e.build(run.ctx, v, b)
		}
	}()
	return nil
}

// buildGuarded runs one build. A panic in the builder (a bug that a
// tenant's Dockerfile or archive reached) fails that build alone instead of
// ending the server, and with it every other tenant's microVMs and builds.
func buildGuarded(ctx context.Context, b Builder, req BuildRequest, log *slog.Logger) (res BuildResult, err error) {
	defer func() {
		if p := recover(); p != nil {
			log.Error("the image builder panicked; this build fails", "panic", p, "stack", string(debug.Stack()))
			err = fmt.Errorf("internal error in kiln's image builder (the server log has the details): %v", p)
		}
	}()
	return b.Build(ctx, req)
}

// buildRun is a version's builds in flight.
type buildRun struct {
	ctx    context.Context // cancelled by DeleteImageVersion (and Close)
	cancel context.CancelFunc
	done   chan struct{} // closed once its builds stopped and cleaned up
}

func versionKey(account, image, version string) string {
	return account + "\x00" + image + "\x00" + version
}

// BuildSizer is optionally implemented by a Builder: the most guest memory
// a build of v runs at once (its build VMs and image VM run one after the
// other), which host admission reserves for the build.
type BuildSizer interface {
	BuildMemoryMiB(v store.ImageVersion) int64
}

func (e *Engine) buildMemory(v store.ImageVersion) int64 {
	if s, ok := e.cfg.Builder.(BuildSizer); ok {
		if n := s.BuildMemoryMiB(v); n > 0 {
			return n
		}
	}
	return lifecycle.DefaultMicrovmMemoryMiB
}

func (e *Engine) build(ctx context.Context, v store.ImageVersion, b store.Build) {
	log := e.log.With("image", v.ImageName, "version", v.Version, "build", b.ID)
	rep := e.cfg.Control
	w := newStoreLog(e, b.ID, e.cfg.BuildLogMaxBytes)
	defer w.Close()
	last := -1
	if err := e.queue.acquire(ctx, func(n int) {
		if n != last {
			last = n
			fmt.Fprintf(w, "waiting for a build slot: %d builds ahead (this host runs %d at once)\n", n, e.cfg.MaxConcurrentBuilds)
			w.Flush()
		}
	}); err != nil {
		e.buildStopped(ctx, log, w, b, nil)
		return
	}
	defer e.queue.release()
	if ctx.Err() != nil {
		e.buildStopped(ctx, log, w, b, nil)
		return
	}
	if err := rep.BuildRunning(ctx, b); err != nil {
		log.Warn("recording build start", "err", err)
		return
	}
	e.meterBuild(ctx, b, true)
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
	mem := e.buildMemory(v)
	if err := e.reserve("build/"+b.ID, mem); err != nil {
		w.Final("\nbuild refused: " + err.Error() + "\n")
		finish(false, "BuildRefused: "+err.Error(), nil)
		return
	}
	defer e.release("build/" + b.ID)
	dir := e.imageDir(v.Account, v.ImageName, v.Version)
	out := filepath.Join(dir, "build-"+safe(b.ID))
	os.RemoveAll(out) // a build interrupted by a restart starts over
	if err := os.MkdirAll(out, 0o700); err != nil {
		finish(false, "BuildFailed: "+err.Error(), nil)
		return
	}
	start := time.Now()
	bctx, cancel := context.WithTimeout(ctx, e.cfg.BuildTimeout)
	res, err := buildGuarded(bctx, e.cfg.Builder, BuildRequest{Version: v, Build: b, OutDir: out, Log: w}, log)
	timedOut := errors.Is(bctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil
	cancel()
	if ctx.Err() != nil {
		e.buildStopped(ctx, log, w, b, err)
		return
	}
	if timedOut {
		reason := fmt.Sprintf("BuildTimedOut: the build did not finish within %s (the server's --build-timeout)", e.cfg.BuildTimeout)
		log.Warn("build timed out", "after", time.Since(start).Round(time.Second))
		w.Final("\n" + reason + "\n")
		finish(false, reason, nil)
		return
	}
	if err != nil {
		log.Warn("build failed", "err", err)
		w.Final(fmt.Sprintf("\nbuild failed: %v\n", err))
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
	if res.App != nil {
		// Before the template: a version that has one has its app's too.
		if err := e.SetApp(v.Account, v.ImageName, v.Version, *res.App); err != nil {
			finish(false, "BuildFailed: recording the app's configuration: "+err.Error(), nil)
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

// buildStopped handles a build whose context ended: at shutdown recovery
// runs it again; when its version was deleted, nothing is reported (the
// records are gone) and DeleteImageVersion removes the files once the
// build has stopped.
func (e *Engine) buildStopped(ctx context.Context, log *slog.Logger, w *storeLog, b store.Build, err error) {
	if e.ctx.Err() != nil {
		return
	}
	e.meterBuild(ctx, b, false) // the time it ran is still used
	log.Info("build cancelled: its image version was deleted", "err", err)
}

// Build log batching: one store write per second or per 256 KiB at most,
// whichever comes first, so that a chatty build does not cost a commit
// per line on the store every tenant waits on.
const (
	logFlushBytes    = 256 << 10
	logFlushInterval = time.Second
)

// storeLog batches build output into the store's build log and caps it
// at max bytes; past the cap it writes one "truncated" line and drops the
// rest (the build goes on; its deadline still ends it).
type storeLog struct {
	e     *Engine
	build string
	max   int64

	mu        sync.Mutex
	buf       []byte
	written   int64 // bytes accepted into the log (buffered or stored)
	truncated bool
	closed    bool
	stop      chan struct{}
	stopped   chan struct{}
}

func newStoreLog(e *Engine, build string, max int64) *storeLog {
	l := &storeLog{e: e, build: build, max: max, stop: make(chan struct{}), stopped: make(chan struct{})}
	go l.ticker()
	return l
}

func (l *storeLog) ticker() {
	defer close(l.stopped)
	t := time.NewTicker(logFlushInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.Flush()
		}
	}
}

// TruncatedLine ends a build log cut at its cap.
func TruncatedLine(max int64) string {
	return fmt.Sprintf("\n[kiln] build log truncated at %d bytes (the server's --build-log-max-bytes): later output is not kept\n", max)
}

// Write never fails the build: output past the cap is dropped.
func (l *storeLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.truncated || l.closed {
		return len(p), nil
	}
	q := p
	if room := l.max - l.written; int64(len(q)) > room {
		q = q[:max(room, 0)]
		l.truncated = true
	}
	l.buf = append(l.buf, q...)
	l.written += int64(len(q))
	if l.truncated {
		l.buf = append(l.buf, TruncatedLine(l.max)...)
	}
	if len(l.buf) >= logFlushBytes || l.truncated {
		l.flushLocked()
	}
	return len(p), nil
}

// Final appends a closing line (the build's outcome) past the cap.
func (l *storeLog) Final(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.buf = append(l.buf, s...)
	l.flushLocked()
}

// Flush writes what is buffered.
func (l *storeLog) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.flushLocked()
}

func (l *storeLog) flushLocked() {
	if len(l.buf) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(l.e.ctx), 30*time.Second)
	defer cancel()
	for off := 0; off < len(l.buf); off += logFlushBytes {
		end := min(off+logFlushBytes, len(l.buf))
		if err := l.e.cfg.Control.AppendBuildLog(ctx, l.build, l.buf[off:end]); err != nil {
			l.e.log.Warn("writing build log", "build", l.build, "err", err)
			break
		}
	}
	l.buf = l.buf[:0]
}

// Close flushes and stops the ticker; later writes are dropped. Closing
// twice is a no-op.
func (l *storeLog) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.flushLocked()
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.stopped
	return nil
}

func (e *Engine) recoverBuilds(ctx context.Context, builds []store.Build) error {
	return e.cfg.Control.RedoBuilds(ctx, builds, e.BuildImage)
}

// DeleteImageVersion implements lifecycle.Backend: the version's files go, unless
// microVMs still run from its template (their disks sit on it); then the
// last of them to terminate removes them (gcTemplate).
//
// A build of the version still queued or running is cancelled first: the
// builder stops its build VMs and removes its mounts and partial files on
// the way out, and the version's files go once it has stopped (on a
// goroutine, within a bound, so the request does not wait for QEMU).
func (e *Engine) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	e.buildMu.Lock()
	run := e.builds[versionKey(account, image, version)]
	e.buildMu.Unlock()
	if run == nil {
		e.gcTemplate(ctx, account, image, version)
		return nil
	}
	e.log.Info("cancelling the build of a deleted image version", "image", image, "version", version)
	run.cancel()
	go func() {
		select {
		case <-run.done:
		case <-time.After(2 * time.Minute):
			e.log.Warn("cancelled build still running after 2 minutes; removing its files anyway", "image", image, "version", version)
		}
		e.gcTemplate(context.WithoutCancel(ctx), account, image, version)
	}()
	return nil
}

// gcTemplate removes a version's files when its record is gone and no
// microVM that is not terminated uses it.
func (e *Engine) gcTemplate(ctx context.Context, account, image, version string) {
	if image == "" || version == "" {
		return
	}
	ctx = context.WithoutCancel(ctx)
	exists, users, err := e.cfg.Control.VersionUsers(ctx, account, image, version)
	if exists {
		return
	}
	if err != nil {
		e.log.Warn("checking template users", "image", image, "version", version, "err", err)
		return
	}
	for _, id := range users {
		if e.lookup(id) != nil {
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
