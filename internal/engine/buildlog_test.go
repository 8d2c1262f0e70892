//go:build linux

package engine

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
)

// TestBuildLogBounded: a RUN that prints without end fills the store's
// build log only up to the cap (default 10 MiB), then one line says the
// rest went.
func TestBuildLogBounded(t *testing.T) {
	ctx := context.Background()
	st := openTestStore(t)
	e, err := New(ctx, Config{Driver: nopDriver{}, Control: lifecycle.NewStoreControl(st), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	w := newStoreLog(e, "b1", e.cfg.BuildLogMaxBytes)
	chunk := bytes.Repeat([]byte("y\n"), 512<<10) // 1 MiB
	for i := 0; i < 40; i++ {
		if n, err := w.Write(chunk); err != nil || n != len(chunk) {
			t.Fatalf("write %d: %d, %v", i, n, err)
		}
	}
	w.Close()
	got, err := st.ReadBuildLog(ctx, "b1", 0, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := TruncatedLine(10 << 20)
	if len(got) != 10<<20+len(want) || !strings.HasSuffix(string(got), want) {
		t.Fatalf("log holds %d bytes ending %q, want %d ending %q", len(got), got[max(0, len(got)-120):], 10<<20+len(want), want)
	}
}
