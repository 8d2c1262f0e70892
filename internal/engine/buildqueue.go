//go:build linux

package engine

import (
	"context"
	"sync"
)

// buildQueue lets at most n builds run at once; the others wait in
// arrival order and are told how many builds are ahead of them whenever
// that changes.
type buildQueue struct {
	mu      sync.Mutex
	n       int
	running int
	waiting []*queued
}

type queued struct {
	ready  chan struct{}
	ahead  func(n int) // told the builds ahead of it
	placed bool        // given a slot
	told   int         // the last number it was told
}

func newBuildQueue(n int) *buildQueue { return &buildQueue{n: n} }

// acquire waits for a slot; ahead is called (not under the queue's lock)
// with the number of builds ahead each time it changes while waiting.
// It returns ctx's error if ctx ends first.
func (q *buildQueue) acquire(ctx context.Context, ahead func(n int)) error {
	q.mu.Lock()
	if q.running < q.n && len(q.waiting) == 0 {
		q.running++
		q.mu.Unlock()
		return nil
	}
	w := &queued{ready: make(chan struct{}), ahead: ahead, told: -1}
	q.waiting = append(q.waiting, w)
	tell := q.positions()
	q.mu.Unlock()
	tell()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		q.mu.Lock()
		if w.placed {
			// The slot came at the same time: hand it on.
			q.mu.Unlock()
			q.release()
			return ctx.Err()
		}
		q.remove(w)
		tell := q.positions()
		q.mu.Unlock()
		tell()
		return ctx.Err()
	}
}

// release frees a slot and gives it to the first waiting build.
func (q *buildQueue) release() {
	q.mu.Lock()
	q.running--
	for q.running < q.n && len(q.waiting) > 0 {
		w := q.waiting[0]
		q.waiting = q.waiting[1:]
		w.placed = true
		q.running++
		close(w.ready)
	}
	tell := q.positions()
	q.mu.Unlock()
	tell()
}

func (q *buildQueue) remove(w *queued) {
	for i, x := range q.waiting {
		if x == w {
			q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
			return
		}
	}
}

// positions returns a func that tells every waiting build whose place
// changed how many builds are ahead (those running and those waiting
// before it), to be called after the lock is released.
func (q *buildQueue) positions() func() {
	type tell struct {
		f func(int)
		n int
	}
	var ts []tell
	for i, w := range q.waiting {
		if n := i + q.running; n != w.told {
			w.told = n
			ts = append(ts, tell{w.ahead, n})
		}
	}
	return func() {
		for _, t := range ts {
			t.f(t.n)
		}
	}
}
