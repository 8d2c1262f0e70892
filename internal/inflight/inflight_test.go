package inflight

import (
	"errors"
	"sync"
	"testing"
)

// Ten concurrent uploads of 30 bytes against a bound of 100: exactly three
// are held at once, and every byte comes back.
func TestHoldBoundsConcurrentUploads(t *testing.T) {
	var b Bytes
	full := errors.New("full")
	var mu sync.Mutex
	var held []func()
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			release, err := b.Hold("A", 30, func(h int64) error {
				if h+30 > 100 {
					return full
				}
				return nil
			})
			if err == nil {
				mu.Lock()
				held = append(held, release)
				mu.Unlock()
			} else if err != full {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if len(held) != 3 {
		t.Fatalf("%d uploads held, want 3", len(held))
	}
	// Another account is not counted.
	if _, err := b.Hold("B", 100, func(h int64) error {
		if h != 0 {
			t.Errorf("B sees %d bytes held", h)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, r := range held {
		r()
		r()
	}
	if h := b.Held("A"); h != 0 {
		t.Errorf("%d bytes still held after release", h)
	}
	if len(b.accounts) != 1 { // B's hold is not released
		t.Errorf("%d accounts in the ledger, want 1", len(b.accounts))
	}
}

// A slow check of one account does not hold up another account's.
func TestHoldAccountsDoNotWait(t *testing.T) {
	var b Bytes
	inCheck, done := make(chan struct{}), make(chan struct{})
	go b.Hold("slow", 1, func(int64) error {
		close(inCheck)
		<-done
		return nil
	})
	<-inCheck
	defer close(done)
	if _, err := b.Hold("other", 1, func(int64) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if h := b.Held("other"); h != 1 {
		t.Errorf("other holds %d, want 1", h)
	}
}
