//go:build linux

package clusterbench

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

// TestBenchSmall runs the whole bench at its smallest: one microVM per
// side, one short request round. The cluster test (test/cluster) checks
// the roles' behaviour; this keeps the bench itself working, cleaning up
// after itself, and its figures filled in. About a minute with KVM.
func TestBenchSmall(t *testing.T) {
	host := kilntest.Requirements(t, "cluster bench", "ip", "nft")
	if err := pglocal.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	bin := t.TempDir()
	// The engine finds the guest agent next to its own binary.
	if err := kilntest.GoBuild(ctx, filepath.Join(bin, "kiln"), "./cmd/kiln", false); err != nil {
		t.Fatal(err)
	}
	if err := kilntest.GoBuild(ctx, filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	res, err := Run(ctx, Options{Kiln: filepath.Join(bin, "kiln"), KernelDir: host.KernelDir, Runs: 1, Rounds: 1,
		Duration: 500 * time.Millisecond, Clients: 2, Progress: testWriter{t}})
	if res != nil {
		b, _ := json.MarshalIndent(res, "", "  ")
		t.Logf("result:\n%s", b)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("bench ran in %v", time.Since(t0).Round(time.Second))
	for name, c := range map[string]Compare{"run to RUNNING": res.RunToRunning, "request p50": res.RequestP50,
		"requests per second": res.RequestsPerSecond} {
		if len(c.Cluster.Samples) != 1 || len(c.Server.Samples) != 1 || c.Cluster.Median <= 0 || c.Server.Median <= 0 || c.Ratio <= 0 {
			t.Errorf("%s: %+v", name, c)
		}
	}
	if len(res.Leftovers) != 2 {
		t.Errorf("leftovers counted for %d kilns, want the node and the server", len(res.Leftovers))
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
