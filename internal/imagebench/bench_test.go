//go:build linux

package imagebench

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// TestBench runs Bench on the python example (about two minutes under
// TCG, with internet for apt-get): only with KILN_BENCH=1.
func TestBench(t *testing.T) {
	if os.Getenv("KILN_BENCH") == "" {
		t.Skip("set KILN_BENCH=1 to run the image benchmark")
	}
	d := newDriver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	rep, err := Bench(ctx, BenchConfig{
		Driver:  d,
		Bases:   &base.Resolver{Managed: &base.Managed{DataDir: vmmtest.DataDir()}},
		Example: filepath.Join("..", "..", "examples", "python-http"),
		Out:     os.Stdout,
		Logger:  testLog,
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.RebuildRatio > 0.10 {
		t.Errorf("unchanged rebuild took %.1f%% of the first build, target ≤ 10%%", 100*rep.RebuildRatio)
	}
	if rep.Speedup < 20 {
		t.Errorf("clone is %.1f× faster than a cold boot, target ≥ 20×", rep.Speedup)
	}
	checkNoNetns(t)
}
