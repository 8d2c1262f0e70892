//go:build linux

package imagebench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// AptBenchConfig configures BenchApt.
type AptBenchConfig struct {
	Driver vmm.Driver
	// Bases resolves FROM debian:12 (the managed base).
	Bases image.BaseResolver
	// Mirrors are the package proxy's mirrors; nil = the host's apt
	// sources (pkgproxy.HostMirrors).
	Mirrors []pkgproxy.Mirror
	// Package is what the apt step installs; "" = "hello".
	Package string
	// Runs is how many times the whole sequence runs, each from empty
	// caches (medians are reported); 0 = 3.
	Runs int
	// MemoryMiB of the build VMs; 0 = 512.
	MemoryMiB int
	// Cold boots every step's VM, as before warm starts (imagebuild.Runner.WarmDir),
	// to compare.
	Cold bool
	// WorkDir holds each run's caches, removed at the end; "" = a
	// temporary folder.
	WorkDir string
	Out     io.Writer
	// BuildLog, if set, receives the build logs, each line prefixed with
	// the seconds since its build began (to see where apt spends them).
	BuildLog io.Writer
	Logger   *slog.Logger
}

// AptBenchRun is one run's figures, in milliseconds.
type AptBenchRun struct {
	FirstMs          float64 `json:"firstMs"`
	FirstAptMs       float64 `json:"firstAptMs"`
	TouchedMs        float64 `json:"touchedMs"`
	TouchedAptMs     float64 `json:"touchedAptMs"`
	UnchangedMs      float64 `json:"unchangedMs"`
	TouchedFetches   int64   `json:"touchedFetches"`
	TouchedCacheHits int64   `json:"touchedCacheHits"`
	// Where the apt step's time went, on the first build and on the
	// rebuild after the touch.
	FirstApt   AptStepTimes `json:"firstApt"`
	TouchedApt AptStepTimes `json:"touchedApt"`
}

// AptStepTimes splits the apt step's time, in milliseconds. Host: the
// image builder's part around the build VM (the step's root disk made
// from the stage's root, the result stored in the step cache). Inspect,
// Boot, Stop, Commit and Finish are imagebuild.Runner's (see imagebuild.StepTimes). Update and
// Install are apt-get's, timed on the host by marker lines the step
// echoes; Mounts is the rest of the exec (mounting and unmounting the
// cache disks, the agent's round trips).
type AptStepTimes struct {
	HostMs    float64 `json:"hostMs"`
	InspectMs float64 `json:"inspectMs"`
	BootMs    float64 `json:"bootMs"`
	MountsMs  float64 `json:"mountsMs"`
	UpdateMs  float64 `json:"updateMs"`
	// UpdateMs split: fetching (up to apt's last Get/Hit/Fetched line) and
	// then reading the indexes into apt's package cache, which apt-get
	// update removes and rebuilds on every run, even when every index was
	// a Hit (the guest's own work; no download cache can save it).
	UpdateFetchMs float64 `json:"updateFetchMs"`
	UpdateCacheMs float64 `json:"updateCacheMs"`
	InstallMs     float64 `json:"installMs"`
	StopMs        float64 `json:"stopMs"`
	CommitMs      float64 `json:"commitMs"`
	FinishMs      float64 `json:"finishMs"`
}

// AptBenchResult is what `kiln bench image --apt` prints as JSON.
type AptBenchResult struct {
	Package string `json:"package"`
	// WarmStarts: step VMs were clones of a warm template (imagebuild.Runner.WarmDir),
	// not cold boots. The first build's apt step includes making the
	// template.
	WarmStarts bool          `json:"warmStarts"`
	Runs       []AptBenchRun `json:"runs"`
	// Medians over the runs: the first build and its apt step, the
	// rebuild after the COPY'd file changed and its apt step (which runs
	// again, served by the package cache), and the unchanged rebuild.
	FirstMs      float64 `json:"firstMs"`
	FirstAptMs   float64 `json:"firstAptMs"`
	TouchedMs    float64 `json:"touchedMs"`
	TouchedAptMs float64 `json:"touchedAptMs"`
	UnchangedMs  float64 `json:"unchangedMs"`
	// AptRatio is TouchedAptMs / FirstAptMs; target ≤ 0.25.
	AptRatio float64 `json:"aptRatio"`
	// The apt step's parts, each the median over the runs.
	FirstApt   AptStepTimes `json:"firstApt"`
	TouchedApt AptStepTimes `json:"touchedApt"`
	// TouchedFetches is the most files any touched rebuild fetched from
	// a mirror (0: everything came from the cache).
	TouchedFetches int64 `json:"touchedFetches"`
}

// JSON renders the result on one line.
func (r AptBenchResult) JSON() string {
	b, _ := json.Marshal(r)
	return string(b)
}

// BenchApt measures what the package cache saves: a Dockerfile that
// COPYs a file and then runs apt-get install is built from empty caches,
// rebuilt after the COPY'd file changed (the apt step runs again, its
// downloads served by the account's package cache), and rebuilt
// unchanged (every step from the step cache). These are root-disk
// builds (no snapshot): the apt step is what is measured. It is `kiln
// bench image --apt`.
func BenchApt(ctx context.Context, cfg AptBenchConfig) (*AptBenchResult, error) {
	if cfg.Driver == nil || cfg.Bases == nil {
		return nil, errors.New("bench: Driver and Bases are required")
	}
	if cfg.Out == nil {
		cfg.Out = os.Stderr
	}
	if cfg.BuildLog == nil {
		cfg.BuildLog = io.Discard
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Package == "" {
		cfg.Package = "hello"
	}
	// It goes into a shell command line: a Debian package name only.
	if strings.Trim(cfg.Package, "abcdefghijklmnopqrstuvwxyz0123456789.+-") != "" {
		return nil, fmt.Errorf("bench: %q is not a Debian package name", cfg.Package)
	}
	if cfg.Runs <= 0 {
		cfg.Runs = 3
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.Mirrors == nil {
		ms, err := pkgproxy.HostMirrors("", nil)
		if err != nil {
			return nil, err
		}
		cfg.Mirrors = ms
	}
	work, err := os.MkdirTemp(cfg.WorkDir, "kiln-bench-apt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	res := &AptBenchResult{Package: cfg.Package, WarmStarts: !cfg.Cold}
	fmt.Fprintf(cfg.Out, "kiln bench image --apt: COPY, then apt-get install %s; %d runs from empty caches; warm starts %v\n", cfg.Package, cfg.Runs, !cfg.Cold)
	for i := 0; i < cfg.Runs; i++ {
		r, err := aptRun(ctx, cfg, filepath.Join(work, fmt.Sprint(i)))
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(cfg.Out, "run %d: first %.1fs (apt %.1fs); after touching the COPY'd file %.1fs (apt %.1fs, %d files from the cache, %d fetched); unchanged %.1fs\n",
			i+1, r.FirstMs/1000, r.FirstAptMs/1000, r.TouchedMs/1000, r.TouchedAptMs/1000, r.TouchedCacheHits, r.TouchedFetches, r.UnchangedMs/1000)
		res.Runs = append(res.Runs, r)
		res.TouchedFetches = max(res.TouchedFetches, r.TouchedFetches)
	}
	pick := func(f func(AptBenchRun) float64) float64 {
		xs := make([]float64, len(res.Runs))
		for i, r := range res.Runs {
			xs[i] = f(r)
		}
		slices.Sort(xs)
		return xs[len(xs)/2]
	}
	res.FirstMs = pick(func(r AptBenchRun) float64 { return r.FirstMs })
	res.FirstAptMs = pick(func(r AptBenchRun) float64 { return r.FirstAptMs })
	res.TouchedMs = pick(func(r AptBenchRun) float64 { return r.TouchedMs })
	res.TouchedAptMs = pick(func(r AptBenchRun) float64 { return r.TouchedAptMs })
	res.UnchangedMs = pick(func(r AptBenchRun) float64 { return r.UnchangedMs })
	res.FirstApt = pickTimes(res.Runs, func(r AptBenchRun) AptStepTimes { return r.FirstApt })
	res.TouchedApt = pickTimes(res.Runs, func(r AptBenchRun) AptStepTimes { return r.TouchedApt })
	if res.FirstAptMs > 0 {
		res.AptRatio = res.TouchedAptMs / res.FirstAptMs
	}
	fmt.Fprintf(cfg.Out, "median: apt step %.1fs first, %.1fs after the touch = %.0f%% (target ≤ 25%%); unchanged rebuild %.1fs\n",
		res.FirstAptMs/1000, res.TouchedAptMs/1000, 100*res.AptRatio, res.UnchangedMs/1000)
	fmt.Fprintf(cfg.Out, "median apt step, first:   %s\n", res.FirstApt)
	fmt.Fprintf(cfg.Out, "median apt step, touched: %s\n", res.TouchedApt)
	return res, nil
}

// aptRun is one sequence from empty step and package caches.
func aptRun(ctx context.Context, cfg AptBenchConfig, dir string) (AptBenchRun, error) {
	var r AptBenchRun
	pkgs, err := pkgproxy.New(pkgproxy.Config{Mirrors: cfg.Mirrors, Dir: filepath.Join(dir, "pkg-cache"), Logger: cfg.Logger})
	if err != nil {
		return r, err
	}
	var steps []imagebuild.StepTimes
	runner := &imagebuild.Runner{Driver: cfg.Driver, MemoryMiB: cfg.MemoryMiB, Packages: pkgs, Logger: cfg.Logger,
		Times: func(t imagebuild.StepTimes) { steps = append(steps, t) }}
	if !cfg.Cold {
		runner.WarmDir = filepath.Join(dir, "warm")
	}
	defer runner.Close()
	ib := &image.Builder{
		DataDir: filepath.Join(dir, "data"),
		Runner:  runner,
		Bases:   cfg.Bases,
		Logger:  cfg.Logger,
	}
	bctx := filepath.Join(dir, "context")
	if err := os.MkdirAll(bctx, 0o755); err != nil {
		return r, err
	}
	df := "FROM debian:12\nCOPY stamp /stamp\n" + aptStep(cfg.Package) + "\n"
	if err := os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(df), 0o644); err != nil {
		return r, err
	}
	const account = "bench"
	st := pkgs.Stats(image.ScopeName(account))
	build := func(what, stamp string) (total, apt float64, parts AptStepTimes, err error) {
		if err := os.WriteFile(filepath.Join(bctx, "stamp"), []byte(stamp), 0o644); err != nil {
			return 0, 0, parts, err
		}
		out := filepath.Join(dir, "out", what+".ext4")
		steps = nil
		start := time.Now()
		marks := &markWriter{w: cfg.BuildLog, start: start, at: map[string]time.Time{}}
		fmt.Fprintf(marks.w, "=== %s build\n", what)
		res, err := ib.Build(ctx, image.Request{Account: account, ContextDir: bctx, Output: out, Log: marks})
		if err != nil {
			return 0, 0, parts, benchErr(what, err)
		}
		total = ms(time.Since(start))
		for _, s := range res.Steps {
			if strings.HasPrefix(s.Instruction, "RUN ") && strings.Contains(s.Instruction, "apt-get install") && !s.Cached {
				apt = ms(s.Duration)
				parts = aptParts(s, steps, marks.at)
			}
		}
		return total, apt, parts, os.Remove(out)
	}
	if r.FirstMs, r.FirstAptMs, r.FirstApt, err = build("first", "1"); err != nil {
		return r, err
	}
	hits, fetches := st.Hits.Load(), st.Fetches.Load()
	if r.TouchedMs, r.TouchedAptMs, r.TouchedApt, err = build("touched", "2"); err != nil {
		return r, err
	}
	r.TouchedCacheHits, r.TouchedFetches = st.Hits.Load()-hits, st.Fetches.Load()-fetches
	if r.UnchangedMs, _, _, err = build("unchanged", "2"); err != nil {
		return r, err
	}
	return r, nil
}

// aptParts splits the apt step s with the runner's times of its line and
// the host times of the step's marker lines.
func aptParts(s image.StepReport, steps []imagebuild.StepTimes, marks map[string]time.Time) AptStepTimes {
	var p AptStepTimes
	for _, t := range steps {
		if t.Line != s.Line {
			continue
		}
		run := t.Inspect + t.Boot + t.Exec + t.Stop + t.Commit + t.Finish
		p.HostMs = ms(s.Duration - run)
		p.InspectMs, p.BootMs, p.StopMs, p.CommitMs, p.FinishMs = ms(t.Inspect), ms(t.Boot), ms(t.Stop), ms(t.Commit), ms(t.Finish)
		p.MountsMs = ms(t.Exec)
	}
	u, i, d := marks[markUpdate], marks[markInstall], marks[markDone]
	if !u.IsZero() && !i.IsZero() && !d.IsZero() {
		p.UpdateMs, p.InstallMs = ms(i.Sub(u)), ms(d.Sub(i))
		p.MountsMs -= p.UpdateMs + p.InstallMs
	}
	if f, l := marks[markFetched], marks[markLists]; !u.IsZero() && !f.IsZero() && !l.IsZero() {
		p.UpdateFetchMs, p.UpdateCacheMs = ms(f.Sub(u)), ms(l.Sub(f))
	}
	return p
}

func (p AptStepTimes) String() string {
	return fmt.Sprintf("host %.1fs, inspect %.1fs, boot %.1fs, mounts %.1fs, apt-get update %.1fs (fetch %.1fs, package cache %.1fs), install %.1fs, stop %.1fs, commit %.1fs, finish %.1fs",
		p.HostMs/1000, p.InspectMs/1000, p.BootMs/1000, p.MountsMs/1000, p.UpdateMs/1000, p.UpdateFetchMs/1000, p.UpdateCacheMs/1000,
		p.InstallMs/1000, p.StopMs/1000, p.CommitMs/1000, p.FinishMs/1000)
}

// pickTimes is the median of each part on its own.
func pickTimes(runs []AptBenchRun, f func(AptBenchRun) AptStepTimes) AptStepTimes {
	med := func(g func(AptStepTimes) float64) float64 {
		xs := make([]float64, len(runs))
		for i, r := range runs {
			xs[i] = g(f(r))
		}
		slices.Sort(xs)
		return xs[len(xs)/2]
	}
	return AptStepTimes{
		HostMs:        med(func(p AptStepTimes) float64 { return p.HostMs }),
		InspectMs:     med(func(p AptStepTimes) float64 { return p.InspectMs }),
		BootMs:        med(func(p AptStepTimes) float64 { return p.BootMs }),
		MountsMs:      med(func(p AptStepTimes) float64 { return p.MountsMs }),
		UpdateMs:      med(func(p AptStepTimes) float64 { return p.UpdateMs }),
		UpdateFetchMs: med(func(p AptStepTimes) float64 { return p.UpdateFetchMs }),
		UpdateCacheMs: med(func(p AptStepTimes) float64 { return p.UpdateCacheMs }),
		InstallMs:     med(func(p AptStepTimes) float64 { return p.InstallMs }),
		StopMs:        med(func(p AptStepTimes) float64 { return p.StopMs }),
		CommitMs:      med(func(p AptStepTimes) float64 { return p.CommitMs }),
		FinishMs:      med(func(p AptStepTimes) float64 { return p.FinishMs }),
	}
}

// Marker lines the apt step echoes between its commands; the bench notes
// when each reaches the host.
const (
	markUpdate  = "kiln-bench: apt-get update"
	markInstall = "kiln-bench: apt-get install"
	markDone    = "kiln-bench: done"
	// Not echoed: when apt-get update's last download line and its
	// "Reading package lists..." (printed once the cache is rebuilt)
	// reached the host.
	markFetched = "apt-get update: last download line"
	markLists   = "apt-get update: package lists read"
)

// aptFetchLine: a line apt-get update prints per index (or at the end of
// its downloads).
func aptFetchLine(l string) bool {
	for _, p := range []string{"Hit:", "Get:", "Ign:", "Err:", "Fetched "} {
		if strings.HasPrefix(l, p) {
			return true
		}
	}
	return false
}

// markWriter notes when each marker line of a build log arrived and
// passes the log's lines on to w, each prefixed with the seconds since
// start.
type markWriter struct {
	w     io.Writer
	start time.Time
	line  []byte
	at    map[string]time.Time
}

func (m *markWriter) Write(b []byte) (int, error) {
	now := time.Now()
	for _, c := range b {
		if c != '\n' {
			if len(m.line) < 4096 {
				m.line = append(m.line, c)
			}
			continue
		}
		l := strings.TrimSpace(string(m.line))
		_, updating := m.at[markUpdate]
		_, installing := m.at[markInstall]
		_, listed := m.at[markLists]
		switch {
		case strings.HasPrefix(l, "kiln-bench: "):
			if _, seen := m.at[l]; !seen {
				m.at[l] = now
			}
		case !updating || installing || listed:
		case aptFetchLine(l):
			m.at[markFetched] = now
		case strings.HasPrefix(l, "Reading package lists"):
			m.at[markLists] = now
		}
		if _, err := fmt.Fprintf(m.w, "%8.2f %s\n", now.Sub(m.start).Seconds(), l); err != nil {
			return 0, err
		}
		m.line = m.line[:0]
	}
	return len(b), nil
}

// aptStep is the benchmark's apt step, written as BuildKit users write
// it and as examples/python-http does (docs/ARCHITECTURE.md, package
// proxy): apt's download cache and package lists live on per-account
// cache mounts, so a rebuild after a change above the step neither
// fetches nor re-parses what the last build left there (the lists, the
// .debs and pkgcache.bin), and the image carries none of them. Debian's
// container images delete downloaded packages after every install
// (docker-clean); kiln's managed base has no such hook, and removing it
// keeps the Dockerfile's cache working on bases that do. The echoes are
// the bench's markers (aptParts), nothing apt needs.
func aptStep(pkg string) string {
	return "RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \\\n" +
		"    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \\\n" +
		"    rm -f /etc/apt/apt.conf.d/docker-clean \\\n" +
		" && echo '" + markUpdate + "' && apt-get update \\\n" +
		" && echo '" + markInstall + "' && apt-get install -y --no-install-recommends " + pkg + " \\\n" +
		" && echo '" + markDone + "'"
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
