//go:build linux

package imagebuild

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// These tests boot real VMs (TCG here) with real networks. Outside CI
// they skip when the engine is not set up; in CI (CI=true) they fail.

var env *vmmtest.Env

func TestMain(m *testing.M) {
	env = vmmtest.SetupOrSkip("imagebuild")
	code := m.Run()
	cleanupShared()
	env.Cleanup()
	os.Exit(code)
}

// kilnDataDir is where the managed base lives (built once, shared).
func kilnDataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	return "/var/lib/kiln"
}

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// newDriver returns a QEMU driver on a short private data dir (unix
// socket paths must stay short). Every VM it still knows is terminated
// at the end of the test.
func newDriver(t testing.TB) *qemu.Driver {
	t.Helper()
	if env == nil {
		t.Skip("engine not set up (run make setup)")
	}
	testenv.NeedRoot(t, "network namespaces")
	dir, err := os.MkdirTemp("", "kib")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := qemu.New(ctx, qemu.Config{DataDir: dir, KernelDir: env.KernelDir, AgentBinary: env.AgentBinary, Log: testLogger()})
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vms, _ := d.List(context.Background())
		for _, v := range vms {
			t.Errorf("vm %s left behind", v.ID)
			d.Terminate(context.Background(), v.ID)
		}
		d.Close()
		os.RemoveAll(dir)
	})
	return d
}

// createdIDs records every VM id the package's builds created.
var (
	createdMu  sync.Mutex
	createdIDs = map[string]bool{}
)

func init() {
	testHookNewVM = func(id string) {
		createdMu.Lock()
		createdIDs[id] = true
		createdMu.Unlock()
	}
}

// checkNoNetns fails if a network namespace of a VM that this package's
// builds created is left (other packages' tests may run at the same time,
// so only our own ids count).
func checkNoNetns(t testing.TB) {
	t.Helper()
	createdMu.Lock()
	defer createdMu.Unlock()
	for id := range createdIDs {
		if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+id)); err == nil {
			t.Errorf("network namespace of %s left behind", id)
		}
	}
}

var _ vmm.Driver = (*qemu.Driver)(nil)
