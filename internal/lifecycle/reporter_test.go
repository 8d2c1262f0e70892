package lifecycle_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestLateBuildStartRefused: a build start reported after the build
// finished (a slow or lost host's report) is refused and changes nothing:
// before the start and its version's change were one transaction, it
// brought the build back to IN_PROGRESS, where it held a slot of the
// account's Builds quota for good and was redone on every restart.
func TestLateBuildStartRefused(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b := pendingBuild(t, st)
	rep := lifecycle.NewReporter(st)
	if err := rep.BuildRunning(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := rep.BuildFinished(ctx, b, true, "", nil); err != nil {
		t.Fatal(err)
	}
	if err := rep.BuildRunning(ctx, b); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a start after the finish: %v, want a conflict", err)
	}
	got, err := st.GetBuild(ctx, b.Account, "app", "1", "b1")
	if err != nil {
		t.Fatal(err)
	}
	u, err := st.QuotaUsage(ctx, b.Account)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != store.BuildSuccessful || u.Builds != 0 {
		t.Errorf("after a late start: build %s, %d builds counted against the quota; want SUCCESSFUL, 0", got.State, u.Builds)
	}
	pending, err := st.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
	if err != nil || len(pending) != 0 {
		t.Errorf("builds a restart would redo: %+v, %v", pending, err)
	}
}
