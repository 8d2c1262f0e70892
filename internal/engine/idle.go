//go:build linux

package engine

import (
	"context"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// The idle controller. A microVM is idle while no request, stream or
// WebSocket is open through the proxy; its own outbound traffic does not
// count. Its idle time runs from the later of its last proxied activity
// and its record's UpdatedAt (when it became RUNNING, or the last activity
// written back), so the timer survives a restart of kiln: activity is
// written to the store at most every activityFlush per VM, and a restart
// can only make a VM look idle for longer than it was by that much.

// activityFlush is how often a busy VM's activity is written to the store.
const activityFlush = 30 * time.Second

// IdleReason prefixes the stateReason of an idle suspend.
const IdleReason = "IdleTimeout: no inbound traffic for maxIdleDurationSeconds"

func (e *Engine) flushActivity(v *vmState, t time.Time) {
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if err := e.cfg.Control.ReportActivity(ctx, v.account, v.id, t); err != nil {
		e.log.Debug("recording activity", "microvm", v.id, "err", err)
	}
}

func (e *Engine) idleLoop(ctx context.Context) {
	t := time.NewTicker(e.cfg.IdleInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e.IdleOnce(ctx)
	}
}

// IdleOnce suspends every RUNNING microVM idle past its
// maxIdleDurationSeconds, through the API server's Suspend (so the record
// goes RUNNING → SUSPENDING → SUSPENDED as for SuspendMicrovm).
func (e *Engine) IdleOnce(ctx context.Context) {
	now := e.now()
	e.mu.Lock()
	var due, flush []*vmState
	for _, v := range e.vms {
		if v.maxIdle == 0 {
			continue
		}
		v.mu.Lock()
		if v.open > 0 {
			// A long stream or WebSocket is activity all along: record it
			// now and then, so a restart does not find the VM idle.
			v.lastActive = now
			if now.Sub(v.flushedAt) >= activityFlush {
				v.flushedAt = now
				flush = append(flush, v)
			}
		} else if idleDue(now, v.running, v.open, v.lastActive, time.Time{}, v.maxIdle) {
			due = append(due, v)
		}
		v.mu.Unlock()
	}
	e.mu.Unlock()
	for _, v := range flush {
		go e.flushActivity(v, now)
	}
	for _, v := range due {
		m, err := e.cfg.Control.Microvm(ctx, v.account, v.id)
		if err != nil || !idleDue(now, m.State == store.StateRunning, 0, v.lastActiveAt(), m.UpdatedAt, v.maxIdle) || v.busy() {
			continue
		}
		e.log.Info("microvm idle: suspending", "microvm", v.id, "idle_for", now.Sub(later(v.lastActiveAt(), m.UpdatedAt)).Round(time.Second))
		if err := e.cfg.Control.RequestSuspend(ctx, v.account, v.id, IdleReason); err != nil {
			e.log.Warn("idle suspend", "microvm", v.id, "err", err)
		}
	}
}

func (v *vmState) lastActiveAt() time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.lastActive
}

func (v *vmState) busy() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.open > 0
}

func isIdleSuspend(reason string) bool { return strings.HasPrefix(reason, "IdleTimeout:") }

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// idleDue decides whether a microVM has been idle long enough to suspend:
// it must be running with no connection open, and its last activity (the
// later of what this process saw and what the store recorded, which is
// what survives a restart) must be maxIdle ago or more.
func idleDue(now time.Time, running bool, open int, lastActive, recorded time.Time, maxIdle time.Duration) bool {
	if !running || open > 0 || maxIdle <= 0 {
		return false
	}
	return now.Sub(later(lastActive, recorded)) >= maxIdle
}

// MarkActive records traffic to a microVM seen elsewhere (a cluster's
// edge, which keeps its own connection counts) at t, for the idle
// controller. Unknown ids are ignored: the edge may be behind.
func (e *Engine) MarkActive(id string, t time.Time) {
	if now := e.now(); t.After(now) {
		t = now // a peer's clock ahead must not keep the VM awake
	}
	if v := e.lookup(id); v != nil {
		v.touch(t)
	}
}
