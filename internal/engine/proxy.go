//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Lookup implements proxy.Backend from memory: every microVM that is not
// terminated has an entry (made at start or recovery), and its routing
// facts never change, so no database read is needed per request.
func (e *Engine) Lookup(ctx context.Context, id string) (proxy.Target, error) {
	v := e.lookup(id)
	if v == nil {
		return proxy.Target{}, proxy.ErrNotFound
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.g == nil {
		if v.gone || v.ctx.Err() != nil {
			// Terminating (TerminateMicrovm cancels v.ctx first): its
			// network is gone before the entry is, and it is not coming back.
			return proxy.Target{}, proxy.ErrNotFound
		}
		return proxy.Target{}, proxy.ErrUnavailable
	}
	return proxy.Target{Account: v.account, Addr: v.g.Net.HostAddr, Ingress: v.ingress, Shell: v.shell}, nil
}

// RunningNow implements proxy.RunningNow from memory: the engine last
// reported the VM RUNNING, and no suspend (SuspendMicrovm clears the
// flag before the VM is paused) or terminate (TerminateMicrovm cancels
// v.ctx first; forget drops the entry) has begun since. Anything else
// sends the request through EnsureRunning, which reads the store.
func (e *Engine) RunningNow(id string) bool {
	v := e.lookup(id)
	if v == nil {
		return false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.running && !v.gone && v.ctx.Err() == nil
}

var _ proxy.RunningNow = (*Engine)(nil)

// pollEvery bounds how long EnsureRunning sleeps between looks at the store
// when no notification comes (a state changed by another path).
const pollEvery = 200 * time.Millisecond

// EnsureRunning implements proxy.Backend: RUNNING returns at once;
// SUSPENDED with autoResumeEnabled is resumed through the API server (so
// the records move exactly as for ResumeMicrovm; concurrent callers share
// one resume, since Server.Resume accepts a pending resume again without a
// second backend call); PENDING and SUSPENDING are waited for.
func (e *Engine) EnsureRunning(ctx context.Context, id string) error {
	for {
		v := e.lookup(id)
		if v == nil {
			return proxy.ErrNotFound
		}
		wait := v.waitChan() // before the read: no change is missed
		m, err := e.cfg.Control.Microvm(ctx, v.account, id)
		if errors.Is(err, errdefs.ErrNotFound) {
			return proxy.ErrNotFound
		}
		if err != nil {
			return fmt.Errorf("reading microvm: %w", err)
		}
		switch m.State {
		case store.StateRunning:
			return nil
		case store.StateTerminating, store.StateTerminated:
			return proxy.ErrNotFound
		case store.StateSuspended:
			if m.IdlePolicy == nil || !m.IdlePolicy.AutoResumeEnabled {
				return proxy.ErrSuspended
			}
			if m.PendingOp != "resume" {
				if err := e.cfg.Control.RequestResume(ctx, m.Account, id); err != nil {
					// A conflict means the state moved meanwhile: look again.
					var be *lifecycle.BackendError
					switch {
					case errors.Is(err, errdefs.ErrExhausted):
						// The host has no room: say so to the client, in
						// the admission's own words.
						if errors.As(err, &be) {
							return be.Err
						}
						return err
					case errors.As(err, &be) || !errors.Is(err, errdefs.ErrConflict):
						return fmt.Errorf("resuming: %w", err)
					}
				}
				continue
			}
		}
		t := time.NewTimer(pollEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-wait:
		case <-t.C:
		}
		t.Stop()
	}
}

// ConnOpened implements proxy.Backend.
func (e *Engine) ConnOpened(id string) {
	if v := e.lookup(id); v != nil {
		now := e.now()
		v.mu.Lock()
		v.open++
		v.lastActive = now
		v.mu.Unlock()
	}
}

// ConnClosed implements proxy.Backend.
func (e *Engine) ConnClosed(id string) {
	v := e.lookup(id)
	if v == nil {
		return
	}
	now := e.now()
	v.mu.Lock()
	if v.open > 0 {
		v.open--
	}
	v.lastActive = now
	flush := now.Sub(v.flushedAt) >= activityFlush
	if flush {
		v.flushedAt = now
	}
	v.mu.Unlock()
	if flush {
		go e.flushActivity(v, now)
	}
}
