package storetest

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// buildStart: StartBuild moves a PENDING build and its version to
// IN_PROGRESS with one event, may be repeated while the build runs, and
// refuses, changing nothing, once the build is final: a late start never
// brings a build back (it would hold a slot of the Builds quota forever).
func buildStart(t *testing.T, s store.Store) {
	img, v, bs := newImage("A", "app")
	bs[0].State = store.BuildPending
	must(t, s.CreateImage(ctx, img, v, bs, nil))
	b := bs[0]
	b.UpdatedAt = time.Now().UTC()
	must(t, s.StartBuild(ctx, b))
	must(t, s.StartBuild(ctx, b)) // a redo after a restart
	gb, err := s.GetBuild(ctx, "A", "app", v.Version, b.ID)
	must(t, err)
	gv, err := s.GetImageVersion(ctx, "A", "app", v.Version)
	must(t, err)
	if gb.State != store.BuildInProgress || gv.State != store.VersionInProgress {
		t.Fatalf("after StartBuild: build %s, version %s", gb.State, gv.State)
	}
	if u, _ := s.QuotaUsage(ctx, "A"); u.Builds != 1 {
		t.Errorf("builds in use while running = %d, want 1", u.Builds)
	}

	b.State, b.Node, b.Platform = store.BuildSuccessful, "n1", "x86_64/q35/cpu-a"
	_, err = s.FinishBuild(ctx, b)
	must(t, err)
	is(t, s.StartBuild(ctx, b), errdefs.ErrConflict)
	gb, _ = s.GetBuild(ctx, "A", "app", v.Version, b.ID)
	gv, _ = s.GetImageVersion(ctx, "A", "app", v.Version)
	if gb.State != store.BuildSuccessful || gv.State != store.VersionSuccessful {
		t.Errorf("a start after the finish left build %s, version %s", gb.State, gv.State)
	}
	// Placement reads the platform from the version (copied into each
	// microVM), not from the builds and their nodes.
	if gv.Platform != b.Platform {
		t.Errorf("version platform after its build succeeded on %q = %q", b.Platform, gv.Platform)
	}
	if u, _ := s.QuotaUsage(ctx, "A"); u.Builds != 0 {
		t.Errorf("builds in use after the finish = %d, want 0", u.Builds)
	}
	evs, _, err := s.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventImageVersion, Resource: "app"}, store.Page{})
	must(t, err)
	var states []string
	for _, ev := range evs {
		states = append(states, ev.State)
	}
	if fmt.Sprint(states) != fmt.Sprint([]string{v.State, store.VersionInProgress, store.VersionSuccessful}) {
		t.Errorf("version events = %v", states)
	}

	b.ID = "nope"
	is(t, s.StartBuild(ctx, b), errdefs.ErrNotFound)
}

// startFinishRace: a build's start and its finish, reported at once
// through two handles (a slow host and the one that finished it), leave
// the build and its version final whichever comes first: the start
// either runs before the finish or is refused after it.
func startFinishRace(t *testing.T, a, b store.Store) {
	for round := 0; round < 20; round++ {
		name := fmt.Sprintf("app%d", round)
		img, v, bs := newImage("A", name)
		bs[0].State = store.BuildPending
		must(t, a.CreateImage(ctx, img, v, bs, nil))
		start, finish := bs[0], bs[0]
		start.UpdatedAt = time.Now().UTC()
		finish.State, finish.UpdatedAt = store.BuildSuccessful, start.UpdatedAt
		var wg sync.WaitGroup
		var startErr, finishErr error
		wg.Add(2)
		go func() { defer wg.Done(); startErr = a.StartBuild(ctx, start) }()
		go func() { defer wg.Done(); _, finishErr = b.FinishBuild(ctx, finish) }()
		wg.Wait()
		must(t, finishErr)
		if startErr != nil {
			is(t, startErr, errdefs.ErrConflict)
		}
		gb, err := b.GetBuild(ctx, "A", name, v.Version, start.ID)
		must(t, err)
		gv, err := a.GetImageVersion(ctx, "A", name, v.Version)
		must(t, err)
		if gb.State != store.BuildSuccessful || gv.State != store.VersionSuccessful {
			t.Fatalf("round %d: build %s, version %s after a start and a finish (start: %v)", round, gb.State, gv.State, startErr)
		}
	}
}

// versionChangesKeepImage: a version's status change or deletion brings
// its image's record up to date in the same transaction, from what is
// stored then, so it never writes back an image read before a build
// finished (which would put a finished image back to UPDATING).
func versionChangesKeepImage(t *testing.T, s store.Store) {
	img, v1, bs := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v1, bs, nil))
	finish := func(b store.Build) {
		t.Helper()
		b.State, b.UpdatedAt = store.BuildSuccessful, time.Now().UTC()
		_, err := s.FinishBuild(ctx, b)
		must(t, err)
	}
	finish(bs[0])
	v2 := v1
	v2.State = store.VersionPending
	v2, bs2, err := s.CreateImageVersion(ctx, v2, []store.Build{{Account: "A", ImageName: "app", ImageARN: img.ARN, ID: "app-b2", State: store.BuildPending, Architecture: "X86_64", CreatedAt: time.Now()}}, nil)
	must(t, err)
	// An API call that read the image now (UPDATING) races the finish of v2.
	finish(bs2[0])
	v1, err = s.GetImageVersion(ctx, "A", "app", v1.Version)
	must(t, err)
	v1.Status, v1.UpdatedAt = store.VersionInactive, time.Now().UTC()
	must(t, s.UpdateImageVersion(ctx, v1))
	got, err := s.GetImage(ctx, "A", "app")
	must(t, err)
	if got.State != store.ImageUpdated || got.LatestActiveVersion != v2.Version {
		t.Fatalf("after v2 finished and v1 went INACTIVE: image %s, latest active %q; want UPDATED, %q", got.State, got.LatestActiveVersion, v2.Version)
	}
	v2, _ = s.GetImageVersion(ctx, "A", "app", v2.Version)
	v2.Status = store.VersionInactive
	must(t, s.UpdateImageVersion(ctx, v2))
	if got, _ = s.GetImage(ctx, "A", "app"); got.LatestActiveVersion != "" {
		t.Errorf("no version active, latest active = %q", got.LatestActiveVersion)
	}
	v1.Status = store.VersionActive
	must(t, s.UpdateImageVersion(ctx, v1))
	if got, _ = s.GetImage(ctx, "A", "app"); got.LatestActiveVersion != v1.Version {
		t.Errorf("v1 active again, latest active = %q", got.LatestActiveVersion)
	}

	// Deleting the version an image is building fails the image; deleting
	// its latest active version moves latestActiveImageVersion back.
	v3, _, err := s.CreateImageVersion(ctx, v2, []store.Build{{Account: "A", ImageName: "app", ImageARN: img.ARN, ID: "app-b3", State: store.BuildPending, Architecture: "X86_64", CreatedAt: time.Now()}}, nil)
	must(t, err)
	must(t, s.DeleteImageVersion(ctx, "A", "app", v3.Version))
	if got, _ = s.GetImage(ctx, "A", "app"); got.State != store.ImageUpdateFailed || got.LatestActiveVersion != v1.Version {
		t.Errorf("after deleting the version being built: image %s, latest active %q", got.State, got.LatestActiveVersion)
	}
	must(t, s.DeleteImageVersion(ctx, "A", "app", v1.Version))
	if got, _ = s.GetImage(ctx, "A", "app"); got.LatestActiveVersion != "" {
		t.Errorf("after deleting the only active version: latest active %q", got.LatestActiveVersion)
	}
}
