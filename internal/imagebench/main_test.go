//go:build linux

package imagebench

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu/qemutest"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// The benchmark's test boots real VMs (TCG here) with real networks, and
// only with KILN_BENCH=1; then outside CI it skips when the engine is not
// set up, and in CI it fails.

var env *vmmtest.Env

func TestMain(m *testing.M) {
	if os.Getenv("KILN_BENCH") != "" {
		env = vmmtest.SetupOrSkip("imagebench")
	}
	code := m.Run()
	env.Cleanup()
	os.Exit(code)
}

var testLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

func newDriver(t testing.TB) *qemu.Driver { return qemutest.Driver(t, env, testLog) }

// checkNoNetns fails if a network namespace of the benchmark's own VMs is
// left. Build VMs' ids are imagebuild's, and other packages' tests may
// build at the same time, so only the bench prefix counts here.
func checkNoNetns(t testing.TB) {
	t.Helper()
	ents, _ := os.ReadDir(netns.NetnsDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), netns.NSPrefix+imagebuild.PrefixBench+"-") {
			t.Errorf("network namespace %s left behind", filepath.Join(netns.NetnsDir, e.Name()))
		}
	}
}
