package lifecycle_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestRedoBuildsGivesUp: a build that kiln never gets to finish (it made
// kiln crash, or be killed, each time) is redone after a restart only
// until MaxInterruptedBuilds starts were interrupted; then it is FAILED
// with the reason, and so is its version. Each restart opens the database
// anew: the count survives kiln.
func TestRedoBuildsGivesUp(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	st, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	b := pendingBuild(t, st)
	// The first start, interrupted: the build stays IN_PROGRESS.
	if err := lifecycle.NewReporter(st).BuildRunning(ctx, b); err != nil {
		t.Fatal(err)
	}
	st.Close()

	redone := 0
	// Each round is one restart of kiln: what the engine's build does
	// first (BuildRunning) happens, then kiln dies again.
	interrupted := func(ctx context.Context, v store.ImageVersion, bs []store.Build) error {
		redone++
		for _, b := range bs {
			if err := lifecycle.NewReporter(st).BuildRunning(ctx, b); err != nil {
				return err
			}
		}
		return nil
	}
	for restart := 1; restart <= 5; restart++ {
		st, err = sqlite.Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		builds, err := st.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
		if err != nil {
			t.Fatal(err)
		}
		if err := lifecycle.RedoBuilds(ctx, st, builds, interrupted); err != nil {
			t.Fatalf("restart %d: %v", restart, err)
		}
		st.Close()
	}
	// Starts: the first, then restarts 1 and 2 redo it; restart 3 finds
	// the third start interrupted and gives up; restarts 4 and 5 find
	// nothing to do.
	if want := lifecycle.MaxInterruptedBuilds - 1; redone != want {
		t.Fatalf("redone %d times, want %d", redone, want)
	}
	st, err = sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	got, err := st.GetBuild(ctx, b.Account, "app", "1", "b1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != store.BuildFailed || !strings.Contains(got.StateReason, "gave up after 3 interrupted attempts") {
		t.Fatalf("build %s: %q", got.State, got.StateReason)
	}
	gv, err := st.GetImageVersion(ctx, b.Account, "app", "1")
	if err != nil {
		t.Fatal(err)
	}
	if gv.State != store.VersionFailed {
		t.Fatalf("version %s", gv.State)
	}
	log, _ := st.ReadBuildLog(ctx, "b1", 0, 1<<20)
	if !strings.Contains(string(log), "gave up after 3 interrupted attempts") {
		t.Fatalf("build log %q", log)
	}
}

// TestRedoBuildsPendingNotCounted: a build that never started is no
// interrupted attempt; restarts keep handing it back.
func TestRedoBuildsPendingNotCounted(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pendingBuild(t, st)
	n := 0
	for i := 0; i < 5; i++ {
		builds, _ := st.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
		if err := lifecycle.RedoBuilds(ctx, st, builds, func(context.Context, store.ImageVersion, []store.Build) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if n != 5 {
		t.Fatalf("pending build handed back %d times, want 5", n)
	}
}

// pendingBuild stores image "app" with version "1" and its one PENDING
// build, and returns the build.
func pendingBuild(t *testing.T, st store.Store) store.Build {
	t.Helper()
	now := time.Now().UTC()
	img := store.Image{Account: "111111111111", Name: "app", ARN: "arn:app", State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: img.Account, ImageName: "app", ImageARN: img.ARN, Version: "1", State: store.VersionPending, Status: store.VersionActive,
		Config: store.ImageConfig{BaseImageArn: "base", CodeArtifact: &store.CodeArtifact{URI: "file:///x"}}, CreatedAt: now, UpdatedAt: now}
	b := store.Build{Account: img.Account, ImageName: "app", ImageARN: img.ARN, Version: "1", ID: "b1", State: store.BuildPending, Architecture: "X86_64", CreatedAt: now}
	if err := st.CreateImage(context.Background(), img, v, []store.Build{b}, nil); err != nil {
		t.Fatal(err)
	}
	return b
}
