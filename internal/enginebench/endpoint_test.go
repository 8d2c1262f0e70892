//go:build linux

package enginebench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/busybox"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// fx is the package's one driver and app template, made in TestMain on
// the shared small base (vmmtest).
var fx *fixture

type fixture struct {
	env      *vmmtest.Env
	work     string
	drv      *qemu.Driver
	template string
	err      error
}

func fxErr() error {
	if fx == nil {
		return errors.New("not set up")
	}
	return fx.err
}

func TestMain(m *testing.M) {
	if testenv.SkipMain("enginebench", "network namespaces and VMs") {
		os.Exit(m.Run())
	}
	env := vmmtest.SetupOrSkip("enginebench")
	if env == nil {
		os.Exit(m.Run())
	}
	fx = &fixture{env: env}
	fx.setup()
	code := m.Run()
	fx.cleanup()
	env.Cleanup()
	os.Exit(code)
}

func (f *fixture) setup() {
	// Unix socket paths must stay short: no t.TempDir here.
	if f.work, f.err = os.MkdirTemp("", "keb"); f.err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f.drv, f.err = qemu.New(ctx, qemu.Config{DataDir: filepath.Join(f.work, "d"), KernelDir: f.env.KernelDir,
		AgentBinary: f.env.AgentBinary, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if f.err != nil {
		return
	}
	app := filepath.Join(f.work, "app")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", app, "../engine/testdata/app")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		f.err = fmt.Errorf("building the test app: %v: %s", err, out)
		return
	}
	f.template, f.err = busybox.AppTemplate(ctx, f.drv, f.env.RootDisk, app, f.work)
}

func (f *fixture) cleanup() {
	if f.drv != nil {
		vms, _ := f.drv.List(context.Background())
		for _, v := range vms {
			f.drv.Terminate(context.Background(), v.ID)
		}
		f.drv.Close()
	}
	if f.work != "" {
		os.RemoveAll(f.work)
	}
}

func shortDir(t *testing.T) string { return vmmtest.ShortDir(t) }

// TestBenchEndpoint runs BenchEndpoint with real microVMs. By default (CI)
// a short version: 5 resume rounds and a 5 s load of 40 connections over 3
// microVMs. KILN_BENCH=1 runs the shape (200 connections over 10
// microVMs) for KILN_BENCH_DURATION (default 10s; the run is 60s):
//
//	KILN_BENCH=1 KILN_BENCH_DURATION=60s go test -run TestBenchEndpoint -v -timeout 10m ./internal/enginebench
func TestBenchEndpoint(t *testing.T) {
	if testing.Short() {
		t.Skip("benchmark with real VMs: not in -short")
	}
	if fx == nil || fx.err != nil {
		if os.Getenv("CI") != "" || fx != nil {
			t.Fatalf("engine bench fixture: %v", fxErr())
		}
		t.Skip("VMs not available")
	}
	o := EndpointBenchOptions{Driver: fx.drv, Template: fx.template, Dir: shortDir(t), Port: 8081,
		ResumeRuns: 5, VMs: 3, Connections: 40, Duration: 5 * time.Second, Progress: testWriter{t}}
	if os.Getenv("KILN_BENCH") == "1" {
		o.VMs, o.Connections, o.Duration = 10, 200, 10*time.Second
		if d, err := time.ParseDuration(os.Getenv("KILN_BENCH_DURATION")); err == nil {
			o.Duration = d
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.Duration+5*time.Minute)
	defer cancel()
	if os.Getenv("KILN_BENCH_BUSYBOX") == "1" {
		// The app `kiln bench endpoint` can use without a Go toolchain.
		tmpl, err := busybox.AppTemplate(ctx, fx.drv, fx.env.RootDisk, "", o.Dir)
		if err != nil {
			t.Fatal(err)
		}
		o.Template, o.Port = tmpl, 8080
	}
	res, err := BenchEndpoint(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + res.String())
	t.Log(res.JSON())
	if res.Load.Failed != 0 {
		t.Errorf("%d of %d requests failed under load", res.Load.Failed, res.Load.Requests)
	}
	if res.Load.Requests == 0 {
		t.Error("the load run sent no requests")
	}
	if res.AutoResume <= 0 || res.EngineResume <= 0 || res.DriverResume <= 0 {
		t.Errorf("missing resume figures: %+v", res)
	}
	// The ratio target (<= 1.5) is reported, not enforced: a shared CI
	// machine's noise should not fail the build.
	for i := 0; i < o.VMs; i++ {
		if _, err := fx.drv.Inspect(context.Background(), benchID(i)); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("microvm %s outlived the benchmark: %v", benchID(i), err)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
