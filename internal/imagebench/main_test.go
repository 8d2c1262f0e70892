//go:build linux

package imagebench

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
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
// socket paths must stay short) that must know no VM at the end.
func newDriver(t testing.TB) *qemu.Driver {
	t.Helper()
	if env == nil {
		t.Skip("engine not set up (run make setup)")
	}
	testenv.NeedRoot(t, "network namespaces")
	dir := vmmtest.ShortDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := qemu.New(ctx, qemu.Config{DataDir: dir, KernelDir: env.KernelDir, AgentBinary: env.AgentBinary, Log: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vms, _ := d.List(context.Background())
		for _, v := range vms {
			t.Errorf("vm %s left behind", v.ID)
			d.Terminate(context.Background(), v.ID)
		}
		d.Close()
	})
	return d
}

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
