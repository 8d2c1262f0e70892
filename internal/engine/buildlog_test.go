//go:build linux

package engine

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestBuildLogBounded: a RUN that prints without end fills the store's
// build log only up to maxBuildLog, then one line says the rest went.
func TestBuildLogBounded(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e := &Engine{cfg: Config{Reporter: api.NewReporter(st)}}
	w := &storeLog{ctx: ctx, e: e, build: "b1"}
	chunk := bytes.Repeat([]byte("y\n"), 512<<10) // 1 MiB
	for i := 0; i < 40; i++ {
		if n, err := w.Write(chunk); err != nil || n != len(chunk) {
			t.Fatalf("write %d: %d, %v", i, n, err)
		}
	}
	got, err := st.ReadBuildLog(ctx, "b1", 0, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > maxBuildLog+200 || len(got) < maxBuildLog {
		t.Fatalf("log holds %d bytes, want about %d", len(got), maxBuildLog)
	}
	if !strings.HasSuffix(string(got), "(build log over 16 MiB: the rest of the output is dropped)\n") {
		t.Fatalf("log ends %q", got[len(got)-80:])
	}
}
