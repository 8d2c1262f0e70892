//go:build linux

package engine

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestBuildLogBounded: a RUN that prints without end fills the store's
// build log only up to the cap (default 10 MiB), then one line says the
// rest went.
func TestBuildLogBounded(t *testing.T) {
	ctx := context.Background()
	e, st := newStoreEngine(t)
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

// TestStoreLogCapAndBatching: output is written in batches, not per
// Write, and is cut at the cap with one "truncated" line; the closing
// line still gets in.
func TestStoreLogCapAndBatching(t *testing.T) {
	ctx := context.Background()
	e, st := newStoreEngine(t)
	counter := &countingStore{Store: st}
	e.cfg.Control = lifecycle.NewStoreControl(counter)
	w := newStoreLog(e, "b1", 1<<20)
	line := []byte(strings.Repeat("y", 99) + "\n")
	for i := 0; i < 30000; i++ { // 3 MB in 30000 writes
		w.Write(line)
	}
	w.Final("the end\n")
	w.Close()
	got, err := st.ReadBuildLog(ctx, "b1", 0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := TruncatedLine(1<<20) + "the end\n"
	if int64(len(got)) != 1<<20+int64(len(want)) || !strings.HasSuffix(string(got), want) {
		t.Errorf("log is %d bytes ending %q; want %d ending %q", len(got), got[max(0, len(got)-200):], 1<<20+len(want), want)
	}
	if n := counter.appends.Load(); n > 8 {
		t.Errorf("%d store writes for 30000 log writes; want batches of 256 KiB", n)
	}
	t.Logf("%d store writes for 30000 log writes (1 MiB kept)", counter.appends.Load())
}

// nopDriver is a vmm.Driver for tests that start no VM.
type nopDriver struct{ vmm.Driver }

type countingStore struct {
	store.Store
	appends atomic.Int64
}

func (c *countingStore) AppendBuildLog(ctx context.Context, id string, data []byte) error {
	c.appends.Add(1)
	return c.Store.AppendBuildLog(ctx, id, data)
}

// newStoreEngine is an engine on nopDriver over a store of its own:
// enough for a build's log, which goes to the store only.
func newStoreEngine(t *testing.T) (*Engine, store.Store) {
	t.Helper()
	st := openTestStore(t)
	e, err := New(context.Background(), Config{Driver: nopDriver{}, Control: lifecycle.NewStoreControl(st), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e, st
}

func openTestStore(t *testing.T) store.Store {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
