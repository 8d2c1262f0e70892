//go:build linux

package imagebench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// BenchConfig configures Bench.
type BenchConfig struct {
	Driver vmm.Driver
	// Bases resolves FROM (normally base.Resolver with the managed bases).
	Bases image.BaseResolver
	// Example is the code package; "" = examples/python-http.
	Example string
	// WorkDir holds the bench's image cache, template cache and versions,
	// all removed at the end; "" = a temporary folder. The first build
	// always starts from an empty cache.
	WorkDir string
	// MemoryMiB of the build and image VMs; 0 = 512.
	MemoryMiB int
	// Clones is how many clones are timed; 0 = 3.
	Clones int
	// Env is the image's environmentVariables; nil = STARTUP_SECONDS=2
	// (the python example's simulated start-up work).
	Env map[string]string
	// Out receives the report; BuildLog, if set, the build logs.
	Out      io.Writer
	BuildLog io.Writer
	Logger   *slog.Logger
}

// BenchReport holds the numbers Bench printed.
type BenchReport struct {
	First        imagebuild.Result `json:"first"`
	FirstTotal   time.Duration     `json:"firstTotal"`
	Rebuild      time.Duration     `json:"rebuild"`
	RebuildRatio float64           `json:"rebuildRatio"` // rebuild / first; target ≤ 0.10
	// CloneTo200 are the times from Clone to the first HTTP 200 on 8080;
	// CloneMedian their median.
	CloneTo200  []time.Duration `json:"cloneTo200"`
	CloneMedian time.Duration   `json:"cloneMedian"`
	// ColdBootTo200 is from Boot of the same root disk, through starting
	// the app, to its first HTTP 200.
	ColdBootTo200 time.Duration `json:"coldBootTo200"`
	Speedup       float64       `json:"speedup"` // cold / clone median; target ≥ 20
}

// Bench builds the example (the python example by default) from an empty
// cache, rebuilds it unchanged, then times clones of its snapshot and a
// cold boot of the same image until each answers HTTP 200, and prints a
// report. It is `kiln bench image`.
func Bench(ctx context.Context, cfg BenchConfig) (*BenchReport, error) {
	if cfg.Driver == nil || cfg.Bases == nil {
		return nil, errors.New("bench: Driver and Bases are required")
	}
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	if cfg.BuildLog == nil {
		cfg.BuildLog = io.Discard
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Example == "" {
		cfg.Example = filepath.Join("examples", "python-http")
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.Clones <= 0 {
		cfg.Clones = 3
	}
	if cfg.Env == nil {
		cfg.Env = map[string]string{"STARTUP_SECONDS": "2"}
	}
	work, err := os.MkdirTemp(cfg.WorkDir, "kiln-bench-image-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	// Build VMs reach the Debian mirror through the package proxy, as
	// under `kiln server` (its cache starts empty too).
	var pkgs *pkgproxy.Proxy
	if ms, err := pkgproxy.HostMirrors("", nil); err == nil {
		if pkgs, err = pkgproxy.New(pkgproxy.Config{Mirrors: ms, Dir: filepath.Join(work, "pkg-cache"), Logger: cfg.Logger}); err != nil {
			return nil, err
		}
	}
	b := &imagebuild.Builder{
		Images: &image.Builder{
			DataDir: filepath.Join(work, "data"),
			Runner:  &imagebuild.Runner{Driver: cfg.Driver, MemoryMiB: cfg.MemoryMiB, Packages: pkgs, Logger: cfg.Logger},
			Bases:   cfg.Bases,
			Logger:  cfg.Logger,
		},
		Driver:   cfg.Driver,
		Source:   source.Config{AllowLocal: true},
		CacheDir: filepath.Join(work, "templates"),
		Logger:   cfg.Logger,
	}
	req := imagebuild.Request{Account: "bench", Source: cfg.Example, Env: cfg.Env, MemoryMiB: cfg.MemoryMiB, Log: cfg.BuildLog}
	rep := &BenchReport{}
	w := cfg.Out
	fmt.Fprintf(w, "kiln bench image: %s, %d MiB\n\n", cfg.Example, cfg.MemoryMiB)

	// 1. First build, empty caches.
	req.OutDir = filepath.Join(work, "v1")
	start := time.Now()
	first, err := b.Build(ctx, req)
	if err != nil {
		return nil, benchErr("first build", err)
	}
	rep.First, rep.FirstTotal = first, time.Since(start)
	fmt.Fprintf(w, "first build: %s\n", rep.FirstTotal.Round(time.Millisecond))
	for _, s := range first.Steps {
		fmt.Fprintf(w, "  %-60.60s %10s%s\n", s.Instruction, s.Duration.Round(time.Millisecond), map[bool]string{true: "  (cached)"}[s.Cached])
	}
	for _, t := range first.Timings {
		if t.Phase != imagebuild.PhaseRootDisk {
			fmt.Fprintf(w, "  %-60.60s %10s\n", "["+t.Phase+"]", t.Duration.Round(time.Millisecond))
		}
	}

	// 2. Unchanged rebuild.
	req.OutDir = filepath.Join(work, "v2")
	start = time.Now()
	second, err := b.Build(ctx, req)
	if err != nil {
		return nil, benchErr("rebuild", err)
	}
	rep.Rebuild = time.Since(start)
	rep.RebuildRatio = float64(rep.Rebuild) / float64(rep.FirstTotal)
	fmt.Fprintf(w, "\nunchanged rebuild: %s = %.1f%% of the first (target ≤ 10%%; snapshot reused: %v)\n",
		rep.Rebuild.Round(time.Millisecond), 100*rep.RebuildRatio, second.CachedTemplate)

	// 3. Clones of the snapshot until the first HTTP 200.
	for i := 0; i < cfg.Clones; i++ {
		d, err := timeClone(ctx, cfg.Driver, first.TemplateDir)
		if err != nil {
			return nil, benchErr("clone", err)
		}
		rep.CloneTo200 = append(rep.CloneTo200, d)
	}
	sorted := append([]time.Duration(nil), rep.CloneTo200...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	rep.CloneMedian = sorted[len(sorted)/2]

	// 4. Cold boot of the same image until the first HTTP 200.
	rep.ColdBootTo200, err = timeColdBoot(ctx, cfg.Driver, first.RootDisk, first.Config, cfg.Env, cfg.MemoryMiB)
	if err != nil {
		return nil, benchErr("cold boot", err)
	}
	rep.Speedup = float64(rep.ColdBootTo200) / float64(rep.CloneMedian)
	fmt.Fprintf(w, "\nstart to first HTTP 200 on 8080:\n")
	fmt.Fprintf(w, "  clone of the snapshot: %s (median of %d: %v)\n", rep.CloneMedian.Round(time.Millisecond), len(rep.CloneTo200), roundAll(rep.CloneTo200))
	fmt.Fprintf(w, "  cold boot + app start: %s\n", rep.ColdBootTo200.Round(time.Millisecond))
	fmt.Fprintf(w, "  speed-up: %.1f× (target ≥ 20×)\n", rep.Speedup)
	return rep, nil
}

func benchErr(what string, err error) error {
	var be *imagebuild.Error
	if errors.As(err, &be) {
		return fmt.Errorf("bench %s: %s", what, be.Reason)
	}
	return fmt.Errorf("bench %s: %w", what, err)
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// timeClone measures Clone → first HTTP 200 from the host (the network
// namespace is made beforehand, as the engine can keep them ready).
func timeClone(ctx context.Context, d vmm.Driver, tmpl string) (time.Duration, error) {
	g, err := guestvm.New(ctx, guestvm.Config{ID: imagebuild.NewID(imagebuild.PrefixBench), Driver: d})
	if err != nil {
		return 0, err
	}
	defer g.Close()
	start := time.Now()
	if _, err := g.Clone(ctx, vmm.CloneSpec{Template: tmpl}); err != nil {
		return 0, err
	}
	if err := first200(ctx, "http://"+g.Net.GuestDial(imagebuild.AppPort)+"/", 60*time.Second); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// timeColdBoot measures Boot → app started as the image runs it → first
// HTTP 200 from the host.
func timeColdBoot(ctx context.Context, d vmm.Driver, rootDisk string, cfg image.Config, env map[string]string, mem int) (time.Duration, error) {
	g, err := guestvm.New(ctx, guestvm.Config{ID: imagebuild.NewID(imagebuild.PrefixBench), Driver: d})
	if err != nil {
		return 0, err
	}
	defer g.Close()
	start := time.Now()
	if _, err := g.Boot(ctx, vmm.BootSpec{RootDisk: rootDisk, MemoryMiB: mem}); err != nil {
		return 0, err
	}
	a, err := d.Agent(ctx, g.ID)
	if err != nil {
		return 0, err
	}
	if _, err := a.Exec(ctx, client.ExecRequest{Argv: cfg.Argv(), Env: imagebuild.MergeEnv(cfg.Env, env), Cwd: cfg.WorkingDir, User: cfg.User, Background: true}); err != nil {
		return 0, err
	}
	if err := first200(ctx, "http://"+g.Net.GuestDial(imagebuild.AppPort)+"/", 5*time.Minute); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// first200 polls url every 10 ms until it answers 200.
func first200(ctx context.Context, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cl := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, DialContext: netns.HostDialer(2 * time.Second).DialContext}}
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		resp, err := cl.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
			last = fmt.Errorf("status %d", resp.StatusCode)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no HTTP 200 from %s within %s: %v", url, timeout, last)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
