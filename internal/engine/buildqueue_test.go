//go:build linux

package engine

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestBuildQueue: with one slot, later builds wait in arrival order and
// are told how many builds are ahead of them; a waiter that gives up
// leaves the queue.
func TestBuildQueue(t *testing.T) {
	q := newBuildQueue(1)
	ctx := context.Background()
	if err := q.acquire(ctx, func(int) { t.Error("the first build waited") }); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	told := map[string][]int{}
	order := make(chan string, 3)
	wait := func(name string, ctx context.Context) chan error {
		done := make(chan error, 1)
		go func() {
			err := q.acquire(ctx, func(n int) { mu.Lock(); told[name] = append(told[name], n); mu.Unlock() })
			if err == nil {
				order <- name
			}
			done <- err
		}()
		// Let it take its place before the next one.
		for {
			mu.Lock()
			n := len(told[name])
			mu.Unlock()
			if n > 0 {
				return done
			}
			time.Sleep(time.Millisecond)
		}
	}
	b := wait("b", ctx)
	cctx, cancel := context.WithCancel(ctx)
	c := wait("c", cctx)
	d := wait("d", ctx)
	cancel()
	if err := <-c; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	q.release() // a → b
	if err := <-b; err != nil || <-order != "b" {
		t.Fatalf("b: %v", err)
	}
	q.release() // b → d
	if err := <-d; err != nil || <-order != "d" {
		t.Fatalf("d: %v", err)
	}
	q.release()
	mu.Lock()
	defer mu.Unlock()
	// b: 1 ahead (a running). c: 2. d: 3, then 2 when c left, then 1
	// when b got the slot.
	if got := told["b"]; len(got) != 1 || got[0] != 1 {
		t.Errorf("b was told %v", got)
	}
	if got := told["d"]; len(got) != 3 || got[0] != 3 || got[1] != 2 || got[2] != 1 {
		t.Errorf("d was told %v", got)
	}
}

// TestStoreLogCapAndBatching: output is written in batches, not per
// Write, and is cut at the cap with one "truncated" line; the closing
// line still gets in.
func TestStoreLogCapAndBatching(t *testing.T) {
	ctx := context.Background()
	st := openTestStore(t)
	e, err := New(ctx, Config{Driver: nopDriver{}, Control: lifecycle.NewStoreControl(st), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
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

func openTestStore(t *testing.T) store.Store {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
