//go:build linux

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Usage metering: the engine keeps one open store.UsageInterval per
// microVM that runs or is suspended, and per build in progress. A state
// change closes the open interval and opens the next, in one store write;
// every MeterInterval the open ones are extended to now, so that a crash
// loses at most that much. After a restart Recover closes what the last
// process left open (CloseOpenUsage) and opens new intervals for the VMs
// it finds running or suspended.
type meter struct {
	mu   sync.Mutex
	open map[string]store.UsageInterval // by microVM or build id
}

// vmSize is what a microVM is metered by.
type vmSize struct{ vcpus, memMiB int }

// sizeOf returns the vCPUs and memory of v, from its version's template.
func (e *Engine) sizeOf(v *vmState) vmSize {
	v.mu.Lock()
	sz := v.size
	v.mu.Unlock()
	if sz.memMiB > 0 {
		return sz
	}
	sz = vmSize{vcpus: 1, memMiB: 512} // the driver's defaults
	if dir, err := e.TemplateFor(v.account, v.image, v.version); err == nil {
		if b, err := os.ReadFile(filepath.Join(dir, "template.json")); err == nil {
			var t vmm.Template
			if json.Unmarshal(b, &t) == nil {
				if t.MemoryMiB > 0 {
					sz.memMiB = t.MemoryMiB
				}
				if t.VCPUs > 0 {
					sz.vcpus = t.VCPUs
				}
			}
		}
	}
	v.mu.Lock()
	v.size = sz
	v.mu.Unlock()
	return sz
}

func usageKind(s store.MicrovmState) string {
	switch s {
	case store.StateRunning, store.StateSuspending, store.StateTerminating:
		return store.UsageRunning
	case store.StateSuspended:
		return store.UsageSuspended
	}
	return ""
}

// meterVM records that v is now in state (since at).
func (e *Engine) meterVM(ctx context.Context, v *vmState, state store.MicrovmState, at time.Time) {
	if at.IsZero() {
		at = e.now()
	}
	kind := usageKind(state)
	e.meter.mu.Lock()
	if e.meter.open == nil {
		e.meter.open = map[string]store.UsageInterval{}
	}
	cur, had := e.meter.open[v.id]
	if had && cur.Kind == kind {
		e.meter.mu.Unlock()
		return
	}
	var put []store.UsageInterval
	if had {
		cur.End, cur.Open = at, false
		put = append(put, cur)
		delete(e.meter.open, v.id)
	}
	e.meter.mu.Unlock()
	if kind != "" {
		sz := e.sizeOf(v)
		iv := store.UsageInterval{Key: fmt.Sprintf("%s/%s/%d", v.id, kind, at.UnixNano()), Account: v.account, Resource: v.id,
			Kind: kind, VCPUs: sz.vcpus, MemoryMiB: sz.memMiB, Start: at, End: at, Open: true, Node: e.cfg.Node}
		e.meter.mu.Lock()
		e.meter.open[v.id] = iv
		e.meter.mu.Unlock()
		put = append(put, iv)
	}
	if err := e.cfg.Control.RecordUsage(ctx, put); err != nil {
		e.log.Warn("recording usage", "microvm", v.id, "err", err)
	}
}

// meterBuild opens (start) or closes the usage interval of a build.
func (e *Engine) meterBuild(ctx context.Context, b store.Build, start bool) {
	now := e.now()
	e.meter.mu.Lock()
	if e.meter.open == nil {
		e.meter.open = map[string]store.UsageInterval{}
	}
	iv, had := e.meter.open[b.ID]
	switch {
	case start:
		iv = store.UsageInterval{Key: fmt.Sprintf("%s/%s/%d", b.ID, store.UsageBuild, now.UnixNano()), Account: b.Account,
			Resource: b.ID, Kind: store.UsageBuild, Start: now, End: now, Open: true, Node: e.cfg.Node}
		e.meter.open[b.ID] = iv
	case had:
		iv.End, iv.Open = now, false
		delete(e.meter.open, b.ID)
	default:
		e.meter.mu.Unlock()
		return
	}
	e.meter.mu.Unlock()
	if err := e.cfg.Control.RecordUsage(context.WithoutCancel(ctx), []store.UsageInterval{iv}); err != nil {
		e.log.Warn("recording build usage", "build", b.ID, "err", err)
	}
}

// meterCheckpoint extends every open interval to now.
func (e *Engine) meterCheckpoint(ctx context.Context) {
	now := e.now()
	e.meter.mu.Lock()
	put := make([]store.UsageInterval, 0, len(e.meter.open))
	for id, iv := range e.meter.open {
		iv.End = now
		e.meter.open[id] = iv
		put = append(put, iv)
	}
	e.meter.mu.Unlock()
	if err := e.cfg.Control.RecordUsage(ctx, put); err != nil {
		e.log.Warn("checkpointing usage", "err", err)
	}
}

func (e *Engine) meterLoop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			e.meterCheckpoint(ctx)
		}
	}
}

// meterRecovered closes what the previous process left open and opens
// intervals for the microVMs the engine now runs or keeps suspended.
// Called at the start (closeOld) and the end of Recover.
func (e *Engine) meterRecovered(ctx context.Context, closeOld bool) {
	if closeOld {
		if n, err := e.cfg.Control.CloseOpenUsage(ctx, e.cfg.Node); err != nil {
			e.log.Warn("closing usage intervals of the previous run", "err", err)
		} else if n > 0 {
			e.log.Info("closed usage intervals at their last checkpoint", "count", n)
		}
		return
	}
	ms, err := e.cfg.Control.HostMicrovms(ctx, e.cfg.Node)
	if err != nil {
		e.log.Warn("listing microvms to meter", "err", err)
		return
	}
	for _, m := range ms {
		if v := e.lookup(m.ID); v != nil && m.State != store.StatePending {
			e.meterVM(ctx, v, m.State, e.now())
		}
	}
}
