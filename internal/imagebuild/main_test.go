//go:build linux

package imagebuild

import (
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu/qemutest"
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
func kilnDataDir() string { return vmmtest.DataDir() }

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func newDriver(t testing.TB) *qemu.Driver { return qemutest.Driver(t, env, testLogger()) }

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
