//go:build linux

package qemutest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/kiln-sandbox/kiln/internal/vmm/busybox"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// AppFixture is what a package's VM tests share, made once in TestMain:
// one QEMU driver and a template of a busybox VM serving a Go test app.
type AppFixture struct {
	Env      *vmmtest.Env
	Work     string // the driver's directory and the app's build
	Driver   *qemu.Driver
	Template string
	// Err says why the set-up failed; the tests that need the fixture
	// fail with it.
	Err error
}

// NewAppFixture builds the Go program at appPkg (a package path relative
// to the calling test's directory) and snapshots a busybox VM serving it.
// prefix names the work directory under the system's temporary one.
func NewAppFixture(env *vmmtest.Env, prefix, appPkg string) *AppFixture {
	f := &AppFixture{Env: env}
	// Unix socket paths must stay short: no t.TempDir here.
	if f.Work, f.Err = os.MkdirTemp("", prefix); f.Err != nil {
		return f
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f.Driver, f.Err = qemu.New(ctx, qemu.Config{DataDir: filepath.Join(f.Work, "d"), KernelDir: env.KernelDir,
		AgentBinary: env.AgentBinary, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if f.Err != nil {
		return f
	}
	app := filepath.Join(f.Work, "app")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", app, appPkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		f.Err = fmt.Errorf("building the test app: %v: %s", err, out)
		return f
	}
	f.Template, f.Err = busybox.AppTemplate(ctx, f.Driver, env.RootDisk, app, f.Work)
	return f
}

// Close terminates every VM the driver still runs, closes it and removes
// the work directory.
func (f *AppFixture) Close() {
	if f.Driver != nil {
		vms, _ := f.Driver.List(context.Background())
		for _, v := range vms {
			f.Driver.Terminate(context.Background(), v.ID)
		}
		f.Driver.Close()
	}
	if f.Work != "" {
		os.RemoveAll(f.Work)
	}
}
