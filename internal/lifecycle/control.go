package lifecycle

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// StoreControl is the engine's control plane (engine.ControlPlane) over a
// store: reports go through a Reporter, requests through the Service the
// engine is attached to, and the few reads to the store. A single `kiln
// server` uses it on its own store, a cluster node on the shared one.
type StoreControl struct {
	st  store.Store
	rep *Reporter

	mu  sync.RWMutex
	srv *Service
}

// NewStoreControl returns the control plane over st. Suspend and resume
// requests fail until SetLifecycle attached the Service (New does, through
// the engine, which forwards its lifecycle.Aware call here).
func NewStoreControl(st store.Store) *StoreControl {
	return &StoreControl{st: st, rep: NewReporter(st)}
}

// SetLifecycle implements Aware.
func (c *StoreControl) SetLifecycle(s *Service) {
	c.mu.Lock()
	c.srv = s
	c.mu.Unlock()
}

func (c *StoreControl) service() (*Service, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.srv == nil {
		return nil, fmt.Errorf("no life cycle attached to the engine's control plane (lifecycle.New with the engine as backend attaches it): %w", errdefs.ErrUnavailable)
	}
	return c.srv, nil
}

// ReportMicrovmState reports under a placement epoch (Reporter.MicrovmStateAt).
func (c *StoreControl) ReportMicrovmState(ctx context.Context, account, id string, epoch int64, from []store.MicrovmState, to store.MicrovmState, reason string) (store.Microvm, error) {
	return c.rep.MicrovmStateAt(ctx, account, id, epoch, from, to, reason)
}

// ReportActivity moves a RUNNING record's UpdatedAt forward to t, which the
// idle controller counts from after a restart.
func (c *StoreControl) ReportActivity(ctx context.Context, account, id string, t time.Time) error {
	_, err := c.st.UpdateMicrovm(ctx, account, id, []store.MicrovmState{store.StateRunning}, func(m *store.Microvm) error {
		if t.After(m.UpdatedAt) {
			m.UpdatedAt = t.UTC()
		}
		return nil
	})
	return err
}

// RequestSuspend goes through Service.Suspend.
func (c *StoreControl) RequestSuspend(ctx context.Context, account, id, reason string) error {
	s, err := c.service()
	if err != nil {
		return err
	}
	return s.Suspend(ctx, account, id, reason)
}

// RequestResume goes through Service.Resume.
func (c *StoreControl) RequestResume(ctx context.Context, account, id string) error {
	s, err := c.service()
	if err != nil {
		return err
	}
	return s.Resume(ctx, account, id)
}

// Microvm reads the record.
func (c *StoreControl) Microvm(ctx context.Context, account, id string) (store.Microvm, error) {
	return c.st.GetMicrovm(ctx, account, id)
}

// liveStates are the states of a microVM that holds a VM or its saved state.
var liveStates = []store.MicrovmState{store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating}

// HostMicrovms lists the live records placed on node: on a cluster's
// store, the node's own (an index), not every host's.
func (c *StoreControl) HostMicrovms(ctx context.Context, node string) ([]store.Microvm, error) {
	if cs, ok := c.st.(interface {
		ListNodeMicrovms(ctx context.Context, node string) ([]store.Microvm, error)
	}); ok && node != "" {
		return cs.ListNodeMicrovms(ctx, node)
	}
	ms, err := c.st.ListMicrovmsInState(ctx, 0, liveStates...)
	if err != nil {
		return nil, err
	}
	out := ms[:0]
	for _, m := range ms {
		if m.Node == node {
			out = append(out, m)
		}
	}
	return out, nil
}

// VersionUsers reads the version's record and the live records started
// from it.
func (c *StoreControl) VersionUsers(ctx context.Context, account, image, version string) (bool, []string, error) {
	if _, err := c.st.GetImageVersion(ctx, account, image, version); err == nil {
		return true, nil, nil
	}
	ms, _, err := c.st.ListMicrovms(ctx, account, store.MicrovmFilter{ImageName: image, ImageVersion: version,
		States: liveStates}, store.Page{Limit: 1000})
	if err != nil {
		return false, nil, err
	}
	ids := make([]string, 0, len(ms))
	for _, m := range ms {
		if !m.State.Final() {
			ids = append(ids, m.ID)
		}
	}
	return false, ids, nil
}

// LegacyVersionSettings reads the version's record.
func (c *StoreControl) LegacyVersionSettings(ctx context.Context, account, image, version string) (*store.Hooks, json.RawMessage, error) {
	v, err := c.st.GetImageVersion(ctx, account, image, version)
	if err != nil {
		return nil, nil, err
	}
	return v.Config.Hooks, v.Config.Logging, nil
}

// BuildRunning is Reporter.BuildRunning.
func (c *StoreControl) BuildRunning(ctx context.Context, b store.Build) error {
	return c.rep.BuildRunning(ctx, b)
}

// AppendBuildLog is Reporter.AppendBuildLog.
func (c *StoreControl) AppendBuildLog(ctx context.Context, buildID string, data []byte) error {
	return c.rep.AppendBuildLog(ctx, buildID, data)
}

// BuildFinished is Reporter.BuildFinished.
func (c *StoreControl) BuildFinished(ctx context.Context, b store.Build, ok bool, reason string, snap *store.SnapshotBuild) error {
	return c.rep.BuildFinished(ctx, b, ok, reason, snap)
}

// RedoBuilds is the package's RedoBuilds on this store.
func (c *StoreControl) RedoBuilds(ctx context.Context, builds []store.Build, build func(context.Context, store.ImageVersion, []store.Build) error) error {
	return RedoBuilds(ctx, c.st, builds, build)
}

// RecordUsage writes the intervals in one transaction.
func (c *StoreControl) RecordUsage(ctx context.Context, iv []store.UsageInterval) error {
	return c.st.PutUsage(ctx, iv)
}

// CloseOpenUsage closes the open intervals node metered.
func (c *StoreControl) CloseOpenUsage(ctx context.Context, node string) (int, error) {
	return c.st.CloseOpenUsage(ctx, node)
}
