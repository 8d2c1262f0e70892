//go:build linux

package imagebuild

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
	// WorkDir holds each run's caches, removed at the end; "" = a
	// temporary folder.
	WorkDir  string
	Out      io.Writer
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
}

// AptBenchResult is what `kiln bench image --apt` prints as JSON.
type AptBenchResult struct {
	Package string        `json:"package"`
	Runs    []AptBenchRun `json:"runs"`
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
	res := &AptBenchResult{Package: cfg.Package}
	fmt.Fprintf(cfg.Out, "kiln bench image --apt: COPY, then apt-get install %s; %d runs from empty caches\n", cfg.Package, cfg.Runs)
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
	if res.FirstAptMs > 0 {
		res.AptRatio = res.TouchedAptMs / res.FirstAptMs
	}
	fmt.Fprintf(cfg.Out, "median: apt step %.1fs first, %.1fs after the touch = %.0f%% (target ≤ 25%%); unchanged rebuild %.1fs\n",
		res.FirstAptMs/1000, res.TouchedAptMs/1000, 100*res.AptRatio, res.UnchangedMs/1000)
	return res, nil
}

// aptRun is one sequence from empty step and package caches.
func aptRun(ctx context.Context, cfg AptBenchConfig, dir string) (AptBenchRun, error) {
	var r AptBenchRun
	pkgs, err := pkgproxy.New(pkgproxy.Config{Mirrors: cfg.Mirrors, Dir: filepath.Join(dir, "pkg-cache"), Logger: cfg.Logger})
	if err != nil {
		return r, err
	}
	ib := &image.Builder{
		DataDir: filepath.Join(dir, "data"),
		Runner:  &Runner{Driver: cfg.Driver, MemoryMiB: cfg.MemoryMiB, Packages: pkgs, Logger: cfg.Logger},
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
	build := func(what, stamp string) (total, apt float64, err error) {
		if err := os.WriteFile(filepath.Join(bctx, "stamp"), []byte(stamp), 0o644); err != nil {
			return 0, 0, err
		}
		out := filepath.Join(dir, "out", what+".ext4")
		start := time.Now()
		res, err := ib.Build(ctx, image.Request{Account: account, ContextDir: bctx, Output: out, Log: cfg.BuildLog})
		if err != nil {
			return 0, 0, benchErr(what, err)
		}
		total = ms(time.Since(start))
		for _, s := range res.Steps {
			if strings.HasPrefix(s.Instruction, "RUN ") && strings.Contains(s.Instruction, "apt-get install") {
				apt = ms(s.Duration)
			}
		}
		return total, apt, os.Remove(out)
	}
	if r.FirstMs, r.FirstAptMs, err = build("first", "1"); err != nil {
		return r, err
	}
	hits, fetches := st.Hits.Load(), st.Fetches.Load()
	if r.TouchedMs, r.TouchedAptMs, err = build("touched", "2"); err != nil {
		return r, err
	}
	r.TouchedCacheHits, r.TouchedFetches = st.Hits.Load()-hits, st.Fetches.Load()-fetches
	if r.UnchangedMs, _, err = build("unchanged", "2"); err != nil {
		return r, err
	}
	return r, nil
}

// aptStep is the benchmark's apt step, written as BuildKit users write
// it and as examples/python-http does (docs/ARCHITECTURE.md, package
// proxy): apt's download cache and package lists live on per-account
// cache mounts, so a rebuild after a change above the step neither
// fetches nor re-parses what the last build left there (the lists, the
// .debs and pkgcache.bin), and the image carries none of them. Debian's
// container images delete downloaded packages after every install
// (docker-clean); kiln's managed base has no such hook, and removing it
// keeps the Dockerfile's cache working on bases that do.
func aptStep(pkg string) string {
	return "RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \\\n" +
		"    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \\\n" +
		"    rm -f /etc/apt/apt.conf.d/docker-clean \\\n" +
		" && apt-get update \\\n" +
		" && apt-get install -y --no-install-recommends " + pkg
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
