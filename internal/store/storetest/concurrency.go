package storetest

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Concurrency runs the cases that need two handles on one database: two
// Store values opened on it, as two kiln processes sharing it would hold.
// open returns both, on a fresh, empty database.
func Concurrency(t *testing.T, open func(t *testing.T) (store.Store, store.Store)) {
	tests := []struct {
		name string
		fn   func(t *testing.T, a, b store.Store)
	}{
		{"build finalised once", finishOnce},
		{"build start and finish race", startFinishRace},
		{"quota across handles", quotaAcrossHandles},
		{"build quota across handles", buildQuotaAcrossHandles},
		{"stale epoch refused", staleEpoch},
		{"placement never over-commits", placeRace},
		{"node expired once", expireRace},
		{"lease taken once", leaseRace},
		{"e2b records across handles", e2bAcrossHandles},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := open(t)
			tt.fn(t, a, b)
		})
	}
}

// finishOnce: the builds of a version, finished at once through two
// handles, finalise the version exactly once (one FinishBuild says so,
// one event records it, the image follows), a failed build makes the
// version FAILED, and the same build finished twice at once is recorded
// once (the other call is a conflict).
func finishOnce(t *testing.T, a, b store.Store) {
	handles := []store.Store{a, b}
	const builds = 6
	for round := 0; round < 4; round++ {
		name := fmt.Sprintf("app%d", round)
		img, v, _ := newImage("A", name)
		var bs []store.Build
		for i := 0; i < builds; i++ {
			bs = append(bs, store.Build{Account: "A", ImageName: name, ImageARN: img.ARN, Version: v.Version,
				ID: fmt.Sprintf("%s-b%d", name, i), State: store.BuildInProgress, CreatedAt: v.CreatedAt})
		}
		must(t, a.CreateImage(ctx, img, v, bs, nil))
		fail := round%2 == 1 // odd rounds: one build fails
		var finalised atomic.Int32
		var wg sync.WaitGroup
		errs := make([]error, 2*builds)
		for i := range errs {
			// Each build is finished twice, once through each handle.
			wg.Add(1)
			go func() {
				defer wg.Done()
				bd := bs[i/2]
				bd.State, bd.UpdatedAt = store.BuildSuccessful, time.Now().UTC()
				if fail && i/2 == 3 {
					bd.State, bd.StateReason = store.BuildFailed, "BuildFailed: step 3"
				}
				done, err := handles[i%2].FinishBuild(ctx, bd)
				if done {
					finalised.Add(1)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i := 0; i < builds; i++ {
			e1, e2 := errs[2*i], errs[2*i+1]
			if (e1 == nil) == (e2 == nil) || !errors.Is(errors.Join(e1, e2), errdefs.ErrConflict) {
				t.Errorf("round %d: build %d finished twice: %v / %v, want one nil and one conflict", round, i, e1, e2)
			}
		}
		if n := finalised.Load(); n != 1 {
			t.Fatalf("round %d: %d calls finalised the version, want 1", round, n)
		}
		got, err := b.GetImageVersion(ctx, "A", name, v.Version)
		must(t, err)
		gotImg, err := b.GetImage(ctx, "A", name)
		must(t, err)
		wantV, wantImg := store.VersionSuccessful, store.ImageCreated
		if fail {
			wantV, wantImg = store.VersionFailed, store.ImageCreateFailed
		}
		if got.State != wantV || gotImg.State != wantImg {
			t.Errorf("round %d: version %s, image %s; want %s, %s", round, got.State, gotImg.State, wantV, wantImg)
		}
		if fail && (got.StateReason != "BuildFailed: step 3" || gotImg.LatestFailedVersion != v.Version) {
			t.Errorf("round %d: failed version = %+v, image %+v", round, got, gotImg)
		}
		if !fail && gotImg.LatestActiveVersion != v.Version {
			t.Errorf("round %d: image latest active version %q", round, gotImg.LatestActiveVersion)
		}
		evs, _, err := a.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventImageVersion, Resource: name, Version: v.Version}, store.Page{})
		must(t, err)
		final := 0
		for _, ev := range evs {
			if ev.State == store.VersionSuccessful || ev.State == store.VersionFailed {
				final++
			}
		}
		if final != 1 {
			t.Errorf("round %d: %d final events for the version: %+v", round, final, evs)
		}
	}
	_, err := a.FinishBuild(ctx, store.Build{Account: "A", ImageName: "nope", Version: "1", ID: "nope", State: store.BuildSuccessful})
	is(t, err, errdefs.ErrNotFound)
}

// quotaAcrossHandles: 20 creates at once, through two handles, against a
// quota of 5 microVMs and 6 vCPUs store 5 microVMs, then a quota of 7
// (raised through the other handle) admits exactly 2 more.
func quotaAcrossHandles(t *testing.T, a, b store.Store) {
	handles := []store.Store{a, b}
	race := func(prefix string, adm store.Admission) int {
		return createRace(t, handles, prefix, adm, func(*store.QuotaError) {})
	}
	adm := store.Admission{Defaults: store.Quota{Microvms: 5, MemoryMiB: -1, VCPUs: 6, Builds: -1, StorageBytes: -1}}
	if ok := race("r", adm); ok != 5 {
		t.Errorf("%d creates succeeded, want 5", ok)
	}
	seven := int64(7)
	must(t, b.SetQuotaOverride(ctx, "A", store.QuotaOverride{Microvms: &seven, VCPUs: &seven}))
	if ok := race("s", adm); ok != 2 {
		t.Errorf("%d creates succeeded after raising the quota to 7, want 2", ok)
	}
	for _, s := range handles {
		u, err := s.QuotaUsage(ctx, "A")
		must(t, err)
		if u.Microvms != 7 || u.VCPUs != 7 {
			t.Fatalf("QuotaUsage = %+v, want 7 microvms and 7 vcpus", u)
		}
	}
}

// staleEpoch: a placement moves a microVM to the next epoch exactly once
// however many reports race for it through two handles; a report made
// under the older epoch is then refused, and one under the current epoch
// applies.
func staleEpoch(t *testing.T, a, b store.Store) {
	now := time.Now().UTC()
	must(t, a.CreateMicrovm(ctx, newVM("A", "vm", now), nil))
	handles := []store.Store{a, b}
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = handles[i%2].UpdateMicrovm(ctx, "A", "vm", nil, store.AtEpoch(0, func(m *store.Microvm) error {
				m.Epoch++
				m.SetState(store.StateRunning, fmt.Sprintf("placed by %d", i), now)
				return nil
			}))
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, store.ErrStaleEpoch) && errors.Is(err, errdefs.ErrConflict):
		default:
			t.Errorf("placement: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d placements moved epoch 0 on, want 1", ok)
	}
	m, err := b.GetMicrovm(ctx, "A", "vm")
	must(t, err)
	if m.Epoch != 1 || m.State != store.StateRunning {
		t.Fatalf("after placement: epoch %d, state %s", m.Epoch, m.State)
	}
	// The host of epoch 0 reports its microVM gone: refused, nothing changes.
	_, err = a.UpdateMicrovm(ctx, "A", "vm", nil, store.AtEpoch(0, func(m *store.Microvm) error {
		m.SetState(store.StateTerminated, "HostLost", now)
		return nil
	}))
	if !errors.Is(err, store.ErrStaleEpoch) || !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("stale report: %v", err)
	}
	m, err = b.UpdateMicrovm(ctx, "A", "vm", nil, store.AtEpoch(1, func(m *store.Microvm) error {
		m.SetState(store.StateSuspending, "SuspendMicrovm", now)
		return nil
	}))
	must(t, err)
	if m.State != store.StateSuspending {
		t.Errorf("current report: state %s", m.State)
	}
	evs, _, err := a.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventMicrovm, Resource: "vm"}, store.Page{})
	must(t, err)
	if len(evs) != 3 { // created, placed once, suspending
		t.Errorf("events = %+v, want 3", evs)
	}
}

// createRace runs 20 CreateMicrovmWithinQuota at once (1 vCPU each),
// spread over handles, hands each quota refusal to refused, and returns
// how many succeeded.
func createRace(t *testing.T, handles []store.Store, prefix string, adm store.Admission, refused func(*store.QuotaError)) int {
	now := time.Now().UTC()
	return race(t, handles, refused, func(s store.Store, i int) error {
		m := newVM("A", fmt.Sprintf("%s%d", prefix, i), now)
		m.VCPUs = 1
		return s.CreateMicrovmWithinQuota(ctx, m, nil, adm)
	})
}

// race runs create 20 times at once, spread over handles, hands each
// quota refusal to refused, and returns how many succeeded.
func race(t *testing.T, handles []store.Store, refused func(*store.QuotaError), create func(s store.Store, i int) error) int {
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = create(handles[i%len(handles)], i)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		var qe *store.QuotaError
		switch {
		case err == nil:
			ok++
		case errors.As(err, &qe) && errors.Is(err, errdefs.ErrExhausted):
			refused(qe)
		default:
			t.Errorf("create: %v", err)
		}
	}
	return ok
}

// buildQuotaAcrossHandles: 20 image creates and new versions at once,
// through two handles, each queueing one build, against a quota of 4
// concurrent builds store exactly 4 builds.
func buildQuotaAcrossHandles(t *testing.T, a, b store.Store) {
	img, v, bs := newImage("A", "base")
	bs[0].State = store.BuildSuccessful
	must(t, a.CreateImage(ctx, img, v, bs, nil))
	adm := store.Admission{Defaults: store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: 4, StorageBytes: -1}}
	ok := race(t, []store.Store{a, b}, func(qe *store.QuotaError) {
		if qe.Quota != store.QuotaBuilds || qe.Limit != 4 || qe.Used != 4 {
			t.Errorf("QuotaError = %+v", qe)
		}
	}, func(s store.Store, i int) error {
		name := fmt.Sprintf("img%d", i)
		if i%2 == 1 { // a new version of the one image
			v := v
			nb := []store.Build{bs[0]}
			nb[0].ID, nb[0].State = name+"-b1", store.BuildPending
			_, _, err := s.CreateImageVersionWithinQuota(ctx, v, nb, nil, adm)
			return err
		}
		img, v, nb := newImage("A", name)
		return s.CreateImageWithinQuota(ctx, img, v, nb, nil, adm)
	})
	u, err := b.QuotaUsage(ctx, "A")
	must(t, err)
	if ok != 4 || u.Builds != 4 {
		t.Fatalf("%d creates succeeded and %d builds queued, want 4 and 4", ok, u.Builds)
	}
}
