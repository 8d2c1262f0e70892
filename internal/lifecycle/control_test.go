package lifecycle_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestStoreControl: what the engine's control plane answers and records,
// on a real SQLite store. The backend that carries out the requested
// suspend is fakebackend (no VMs): what is tested is the control plane's
// side, that the request went through the life cycle.
func TestStoreControl(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const acct = "111111111111"
	port := int64(9000)
	now := time.Now().UTC().Truncate(time.Millisecond)
	img := store.Image{Account: acct, Name: "app", ARN: "arn:app", State: store.ImageCreated, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: acct, ImageName: "app", ImageARN: img.ARN, Version: "1", State: store.VersionSuccessful, Status: store.VersionActive,
		Config: store.ImageConfig{Hooks: &store.Hooks{Port: &port}, Logging: []byte(`{"disabled":{}}`)}, CreatedAt: now, UpdatedAt: now}
	if err := st.CreateImage(ctx, img, v, nil, nil); err != nil {
		t.Fatal(err)
	}
	mk := func(id, node, version string, state store.MicrovmState) {
		m := store.Microvm{ID: id, Account: acct, ARN: "arn:" + id, State: state, ImageName: "app", ImageVersion: version, Node: node,
			MaximumDurationInSeconds: 600, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute)}
		if err := st.CreateMicrovm(ctx, m, nil); err != nil {
			t.Fatal(err)
		}
	}
	mk("mvm-run", "", "1", store.StateRunning)
	mk("mvm-sus", "", "9", store.StateSuspended)
	mk("mvm-end", "", "9", store.StateTerminated)
	mk("mvm-other", "n2", "9", store.StateRunning)
	c := lifecycle.NewStoreControl(st)

	ms, err := c.HostMicrovms(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range ms {
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"mvm-run", "mvm-sus"}) {
		t.Errorf("HostMicrovms(\"\") = %v, want the live records placed on no node", ids)
	}

	if ms, err := c.HostMicrovms(ctx, "n2"); err != nil || len(ms) != 1 || ms[0].ID != "mvm-other" {
		t.Errorf("HostMicrovms(\"n2\") = %+v, %v; want mvm-other alone", ms, err)
	}

	if exists, _, err := c.VersionUsers(ctx, acct, "app", "1"); err != nil || !exists {
		t.Errorf("VersionUsers of an existing version: %v, %v", exists, err)
	}
	exists, users, err := c.VersionUsers(ctx, acct, "app", "9")
	slices.Sort(users)
	if err != nil || exists || !slices.Equal(users, []string{"mvm-other", "mvm-sus"}) {
		t.Errorf("VersionUsers of a deleted version: %v %v %v; want false, its live microVMs on any node", exists, users, err)
	}

	h, logging, err := c.LegacyVersionSettings(ctx, acct, "app", "1")
	if err != nil || h == nil || h.Port == nil || *h.Port != port || string(logging) != `{"disabled":{}}` {
		t.Errorf("LegacyVersionSettings: %+v %s %v", h, logging, err)
	}

	// Activity moves the idle clock forward only, and only while RUNNING.
	later := now.Add(time.Minute)
	if err := c.ReportActivity(ctx, acct, "mvm-run", later); err != nil {
		t.Fatal(err)
	}
	if err := c.ReportActivity(ctx, acct, "mvm-run", now); err != nil {
		t.Fatal(err)
	}
	if m, err := c.Microvm(ctx, acct, "mvm-run"); err != nil || !m.UpdatedAt.Equal(later) {
		t.Errorf("after activity: UpdatedAt %v (%v), want %v", m.UpdatedAt, err, later)
	}
	if err := c.ReportActivity(ctx, acct, "mvm-sus", later); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("activity of a suspended microVM: %v, want a conflict", err)
	}

	// A report under an epoch the record has left is refused.
	if _, err := c.ReportMicrovmState(ctx, acct, "mvm-run", 7, nil, store.StateTerminated, "x"); !errors.Is(err, store.ErrStaleEpoch) {
		t.Errorf("report at a stale epoch: %v, want ErrStaleEpoch", err)
	}

	// Requests need the life cycle, which lifecycle.New attaches.
	if err := c.RequestSuspend(ctx, acct, "mvm-run", "IdleTimeout: test"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("a suspend before a life cycle is attached: %v, want ErrUnavailable", err)
	}
	fb := fakebackend.New(lifecycle.NewReporter(st), 0)
	c.SetLifecycle(lifecycle.New(st, fb, nil))
	state := func(id string) store.MicrovmState {
		t.Helper()
		fb.Wait()
		m, err := c.Microvm(ctx, acct, id)
		if err != nil {
			t.Fatal(err)
		}
		return m.State
	}
	if err := c.RequestSuspend(ctx, acct, "mvm-run", "IdleTimeout: test"); err != nil {
		t.Fatal(err)
	}
	if s := state("mvm-run"); s != store.StateSuspended {
		t.Errorf("after RequestSuspend: %s, want SUSPENDED", s)
	}
	if err := c.RequestResume(ctx, acct, "mvm-run"); err != nil {
		t.Fatal(err)
	}
	if s := state("mvm-run"); s != store.StateRunning {
		t.Errorf("after RequestResume: %s, want RUNNING", s)
	}
	if got := fb.Calls(); !slices.Equal(got, []string{"SuspendMicrovm mvm-run", "ResumeMicrovm mvm-run"}) {
		t.Errorf("backend calls %v, want a suspend and a resume", got)
	}
}
