//go:build linux

package engine

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
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
