// Package storetest is the conformance suite every store.Store
// implementation runs (SQLite and PostgreSQL), so that they keep the same
// contract: Run with one handle, Concurrency with two on one database.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Run runs the suite; open returns a fresh, empty store.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"access keys", accessKeys},
		{"images and versions", images},
		{"build logs", buildLogs},
		{"build start", buildStart},
		{"version changes keep the image", versionChangesKeepImage},
		{"microvms", microvms},
		{"microvm deadlines", deadlines},
		{"client tokens", clientTokens},
		{"tags", tags},
		{"settings", settings},
		{"quota race", quotaRace},
		{"quotas", quotas},
		{"garbage collection", collect},
		{"events", events},
		{"usage", usage},
		{"nul bytes", nulBytes},
		{"e2b keys", e2bKeys},
		{"e2b sandboxes", e2bSandboxes},
		{"e2b tags", e2bTags},
		{"e2b builds", e2bBuilds},
		{"e2b snapshots", e2bSnapshots},
		{"cluster nodes", nodes},
		{"cluster placement", placement},
		{"cluster host lost", hostLost},
		{"cluster leases", leases},
		{"uploads", uploads},
		{"upload quota", uploadQuota},
		{"template files", templateFiles},
		{"template files bound", templateFilesBound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, open(t)) })
	}
}

var ctx = context.Background()

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func is(t *testing.T, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("got %v, want %v", err, want)
	}
}

func accessKeys(t *testing.T, s store.Store) {
	k := store.AccessKey{ID: "AKIA1", Secret: "s", Account: "111111111111", Description: "d", CreatedAt: time.Now().UTC()}
	must(t, s.CreateAccessKey(ctx, k))
	is(t, s.CreateAccessKey(ctx, k), errdefs.ErrConflict)
	got, err := s.GetAccessKey(ctx, "AKIA1")
	must(t, err)
	if got.Secret != "s" || got.Account != k.Account || !got.CreatedAt.Equal(k.CreatedAt) {
		t.Errorf("GetAccessKey = %+v", got)
	}
	_, err = s.GetAccessKey(ctx, "AKIA2")
	is(t, err, errdefs.ErrNotFound)
	ks, err := s.ListAccessKeys(ctx)
	must(t, err)
	if len(ks) != 1 {
		t.Errorf("ListAccessKeys = %v", ks)
	}
	must(t, s.DeleteAccessKey(ctx, "AKIA1"))
	is(t, s.DeleteAccessKey(ctx, "AKIA1"), errdefs.ErrNotFound)
}

func settings(t *testing.T, s store.Store) {
	_, err := s.GetSetting(ctx, store.SettingOperatorAccount)
	is(t, err, errdefs.ErrNotFound)
	must(t, s.SetSetting(ctx, store.SettingOperatorAccount, "111111111111"))
	must(t, s.SetSetting(ctx, store.SettingOperatorAccount, "222222222222"))
	v, err := s.GetSetting(ctx, store.SettingOperatorAccount)
	must(t, err)
	if v != "222222222222" {
		t.Errorf("GetSetting = %q", v)
	}
	// Deleting keys leaves settings alone: the operator is not derived
	// from keys.
	k := store.AccessKey{ID: "AKIA9", Secret: "s", Account: "222222222222", CreatedAt: time.Now().UTC()}
	must(t, s.CreateAccessKey(ctx, k))
	must(t, s.DeleteAccessKey(ctx, k.ID))
	if v, err := s.GetSetting(ctx, store.SettingOperatorAccount); err != nil || v != "222222222222" {
		t.Errorf("after deleting the key: %q, %v", v, err)
	}
}

func newImage(account, name string) (store.Image, store.ImageVersion, []store.Build) {
	now := time.Now().UTC()
	img := store.Image{Account: account, Name: name, ARN: "arn:" + name, State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: account, ImageName: name, ImageARN: img.ARN, Version: "1", State: store.VersionPending, Status: store.VersionActive,
		Config: store.ImageConfig{BaseImageArn: "base", CodeArtifact: &store.CodeArtifact{URI: "file:///x"}}, CreatedAt: now, UpdatedAt: now}
	b := []store.Build{{Account: account, ImageName: name, ImageARN: img.ARN, Version: "1", ID: name + "-b1", State: store.BuildPending, Architecture: "X86_64", CreatedAt: now}}
	return img, v, b
}

func images(t *testing.T, s store.Store) {
	img, v, b := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v, b, nil))
	img2, v2, b2 := newImage("A", "app")
	b2[0].ID = "other"
	is(t, s.CreateImage(ctx, img2, v2, b2, nil), errdefs.ErrConflict)
	// Same name, other account: fine.
	img3, v3, b3 := newImage("B", "app")
	b3[0].ID = "b-build"
	must(t, s.CreateImage(ctx, img3, v3, b3, nil))

	got, err := s.GetImage(ctx, "A", "app")
	must(t, err)
	if got.ARN != "arn:app" || got.State != store.ImageCreating {
		t.Errorf("GetImage = %+v", got)
	}
	gv, err := s.GetImageVersion(ctx, "A", "app", "1")
	must(t, err)
	if gv.Config.CodeArtifact == nil || gv.Config.CodeArtifact.URI != "file:///x" {
		t.Errorf("GetImageVersion config = %+v", gv.Config)
	}

	nv := v
	nv.Version = "ignored"
	nb := []store.Build{{Account: "A", ImageName: "app", ID: "app-b2", State: store.BuildPending}}
	made, madeBuilds, err := s.CreateImageVersion(ctx, nv, nb, nil)
	must(t, err)
	if made.Version != "2.0" || madeBuilds[0].Version != "2.0" {
		t.Errorf("CreateImageVersion numbered %q / %q, want 2.0", made.Version, madeBuilds[0].Version)
	}
	if got, _ := s.GetImage(ctx, "A", "app"); got.State != store.ImageUpdating || got.LatestVersion != "2.0" {
		t.Errorf("image after CreateImageVersion = %+v", got)
	}
	_, _, err = s.CreateImageVersion(ctx, store.ImageVersion{Account: "A", ImageName: "nope"}, nil, nil)
	is(t, err, errdefs.ErrNotFound)

	vs, next, err := s.ListImageVersions(ctx, "A", "app", store.Page{Limit: 1})
	must(t, err)
	if len(vs) != 1 || vs[0].Version != "1" || next == "" {
		t.Fatalf("ListImageVersions page 1 = %v, %q", vs, next)
	}
	vs, next, err = s.ListImageVersions(ctx, "A", "app", store.Page{Limit: 1, Token: next})
	must(t, err)
	if len(vs) != 1 || vs[0].Version != "2.0" || next != "" {
		t.Fatalf("ListImageVersions page 2 = %v, %q", vs, next)
	}
	_, _, err = s.ListImageVersions(ctx, "A", "app", store.Page{Token: "%%%"})
	is(t, err, errdefs.ErrInvalid)

	bd, err := s.GetBuild(ctx, "A", "app", "2.0", "app-b2")
	must(t, err)
	bd.State = store.BuildSuccessful
	must(t, s.UpdateBuild(ctx, bd))
	pending, err := s.ListBuildsInState(ctx, store.BuildPending)
	must(t, err)
	if len(pending) != 2 { // A's app-b1 and B's b-build
		t.Errorf("ListBuildsInState(PENDING) = %d builds", len(pending))
	}
	bs, _, err := s.ListBuilds(ctx, "A", "app", "2.0", store.Page{})
	must(t, err)
	if len(bs) != 1 || bs[0].State != store.BuildSuccessful {
		t.Errorf("ListBuilds = %v", bs)
	}

	imgs, _, err := s.ListImages(ctx, "A", "pp", store.Page{})
	must(t, err)
	if len(imgs) != 1 {
		t.Errorf("ListImages(filter pp) = %v", imgs)
	}
	imgs, _, _ = s.ListImages(ctx, "A", "zz", store.Page{})
	if len(imgs) != 0 {
		t.Errorf("ListImages(filter zz) = %v", imgs)
	}

	must(t, s.TagResource(ctx, "A", "arn:app", map[string]string{"k": "v"}))
	must(t, s.DeleteImageVersion(ctx, "A", "app", "2.0"))
	is(t, s.DeleteImageVersion(ctx, "A", "app", "2.0"), errdefs.ErrNotFound)
	_, err = s.GetBuild(ctx, "A", "app", "2.0", "app-b2")
	is(t, err, errdefs.ErrNotFound)
	must(t, s.DeleteImage(ctx, "A", "app"))
	_, err = s.GetImageVersion(ctx, "A", "app", "1")
	is(t, err, errdefs.ErrNotFound)
	if tg, _ := s.GetTags(ctx, "A", "arn:app"); len(tg) != 0 {
		t.Errorf("tags survived DeleteImage: %v", tg)
	}
	is(t, s.DeleteImage(ctx, "A", "app"), errdefs.ErrNotFound)
	if _, err := s.GetImage(ctx, "B", "app"); err != nil {
		t.Errorf("other account's image gone: %v", err)
	}
}

func buildLogs(t *testing.T, s store.Store) {
	must(t, s.AppendBuildLog(ctx, "b", []byte("hello ")))
	must(t, s.AppendBuildLog(ctx, "b", []byte("world\n")))
	must(t, s.AppendBuildLog(ctx, "c", []byte("other")))
	for _, tt := range []struct {
		off   int64
		limit int
		want  string
	}{{0, 100, "hello world\n"}, {3, 100, "lo world\n"}, {6, 3, "wor"}, {12, 10, ""}, {50, 10, ""}} {
		got, err := s.ReadBuildLog(ctx, "b", tt.off, tt.limit)
		must(t, err)
		if string(got) != tt.want {
			t.Errorf("ReadBuildLog(%d, %d) = %q, want %q", tt.off, tt.limit, got, tt.want)
		}
	}
}

func newVM(account, id string, now time.Time) store.Microvm {
	return store.Microvm{ID: id, Account: account, State: store.StatePending, ImageName: "app", ImageVersion: "1",
		StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(time.Hour), MaximumDurationInSeconds: 3600}
}

func microvms(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	for i := 0; i < 5; i++ {
		must(t, s.CreateMicrovm(ctx, newVM("A", fmt.Sprintf("vm%d", i), now), nil))
	}
	must(t, s.CreateMicrovm(ctx, newVM("B", "vmB", now), nil))
	is(t, s.CreateMicrovm(ctx, newVM("A", "vm0", now), nil), errdefs.ErrConflict)

	_, err := s.GetMicrovm(ctx, "B", "vm0")
	is(t, err, errdefs.ErrNotFound)
	_, err = s.UpdateMicrovm(ctx, "B", "vm0", nil, func(*store.Microvm) error { return nil })
	is(t, err, errdefs.ErrNotFound)

	m, err := s.UpdateMicrovm(ctx, "A", "vm0", []store.MicrovmState{store.StatePending}, func(m *store.Microvm) error {
		m.SetState(store.StateRunning, "", now)
		return nil
	})
	must(t, err)
	if m.State != store.StateRunning {
		t.Errorf("UpdateMicrovm returned %s", m.State)
	}
	_, err = s.UpdateMicrovm(ctx, "A", "vm0", []store.MicrovmState{store.StatePending}, func(*store.Microvm) error {
		t.Error("change called despite the state")
		return nil
	})
	is(t, err, errdefs.ErrConflict)
	// An error from change rolls back.
	_, err = s.UpdateMicrovm(ctx, "A", "vm0", nil, func(m *store.Microvm) error {
		m.State = store.StateTerminated
		return fmt.Errorf("no: %w", errdefs.ErrConflict)
	})
	is(t, err, errdefs.ErrConflict)
	if got, _ := s.GetMicrovm(ctx, "A", "vm0"); got.State != store.StateRunning {
		t.Errorf("state after failed change = %s", got.State)
	}

	all, next, err := s.ListMicrovms(ctx, "A", store.MicrovmFilter{}, store.Page{Limit: 2})
	must(t, err)
	n := len(all)
	for next != "" {
		var page []store.Microvm
		page, next, err = s.ListMicrovms(ctx, "A", store.MicrovmFilter{}, store.Page{Limit: 2, Token: next})
		must(t, err)
		n += len(page)
	}
	if n != 5 {
		t.Errorf("paged through %d of A's microvms, want 5", n)
	}
	running, _, err := s.ListMicrovms(ctx, "A", store.MicrovmFilter{States: []store.MicrovmState{store.StateRunning}, ImageName: "app", ImageVersion: "1"}, store.Page{})
	must(t, err)
	if len(running) != 1 || running[0].ID != "vm0" {
		t.Errorf("ListMicrovms(RUNNING) = %v", running)
	}
	pending, err := s.ListMicrovmsInState(ctx, 0, store.StatePending)
	must(t, err)
	if len(pending) != 5 { // vm1..vm4 and vmB
		t.Errorf("ListMicrovmsInState(PENDING) = %d", len(pending))
	}
	c, err := s.CountMicrovms(ctx, "A")
	must(t, err)
	if c != 5 {
		t.Errorf("CountMicrovms = %d", c)
	}
	_, err = s.UpdateMicrovm(ctx, "A", "vm1", nil, func(m *store.Microvm) error { m.SetState(store.StateTerminated, "x", now); return nil })
	must(t, err)
	if c, _ := s.CountMicrovms(ctx, "A"); c != 4 {
		t.Errorf("CountMicrovms after terminating one = %d", c)
	}
}

func deadlines(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	past := newVM("A", "past", now)
	past.DeadlineAt = now.Add(-time.Second)
	must(t, s.CreateMicrovm(ctx, past, nil))
	must(t, s.CreateMicrovm(ctx, newVM("A", "future", now), nil))
	susp := newVM("A", "susp", now)
	susp.IdlePolicy = &store.IdlePolicy{MaxIdleDurationSeconds: 60, SuspendedDurationSeconds: 0}
	must(t, s.CreateMicrovm(ctx, susp, nil))
	_, err := s.UpdateMicrovm(ctx, "A", "susp", nil, func(m *store.Microvm) error {
		m.SetState(store.StateSuspended, "", now.Add(-time.Second))
		return nil
	})
	must(t, err)
	due, err := s.ListMicrovmsDue(ctx, now, 10)
	must(t, err)
	ids := map[string]bool{}
	for _, m := range due {
		ids[m.ID] = true
	}
	if len(due) != 2 || !ids["past"] || !ids["susp"] {
		t.Errorf("ListMicrovmsDue = %v", ids)
	}
	_, err = s.UpdateMicrovm(ctx, "A", "past", nil, func(m *store.Microvm) error { m.SetState(store.StateTerminating, "", now); return nil })
	must(t, err)
	if due, _ := s.ListMicrovmsDue(ctx, now, 10); len(due) != 1 {
		t.Errorf("TERMINATING microvm still due: %d", len(due))
	}
}

func clientTokens(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	tok := &store.ClientToken{Account: "A", Operation: "RunMicrovm", Token: "t", InputHash: "h", ResourceID: "vm1", CreatedAt: now}
	must(t, s.CreateMicrovm(ctx, newVM("A", "vm1", now), tok))
	got, err := s.GetClientToken(ctx, "A", "RunMicrovm", "t")
	must(t, err)
	if got.ResourceID != "vm1" || got.InputHash != "h" {
		t.Errorf("GetClientToken = %+v", got)
	}
	// Reusing the token fails and rolls the new microVM back.
	is(t, s.CreateMicrovm(ctx, newVM("A", "vm2", now), tok), errdefs.ErrConflict)
	_, err = s.GetMicrovm(ctx, "A", "vm2")
	is(t, err, errdefs.ErrNotFound)
	_, err = s.GetClientToken(ctx, "B", "RunMicrovm", "t")
	is(t, err, errdefs.ErrNotFound)
}

func tags(t *testing.T, s store.Store) {
	must(t, s.TagResource(ctx, "A", "arn:x", map[string]string{"a": "1", "b": "2"}))
	must(t, s.TagResource(ctx, "A", "arn:x", map[string]string{"a": "3"}))
	must(t, s.UntagResource(ctx, "A", "arn:x", []string{"b", "zz"}))
	got, err := s.GetTags(ctx, "A", "arn:x")
	must(t, err)
	if len(got) != 1 || got["a"] != "3" {
		t.Errorf("GetTags = %v", got)
	}
	if got, _ := s.GetTags(ctx, "B", "arn:x"); len(got) != 0 {
		t.Errorf("another account sees tags: %v", got)
	}
	// Concurrent requests that each fit alone do not pass the bound
	// together, and a refused one changes nothing.
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			batch := map[string]string{}
			for j := range 20 {
				batch[fmt.Sprintf("k%d-%d", i, j)] = "v"
			}
			errs[i] = s.TagResource(ctx, "A", "arn:race", batch)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		var many *store.TooManyTagsError
		switch {
		case err == nil:
			ok++
		case !errors.As(err, &many) || !errors.Is(err, errdefs.ErrExhausted):
			t.Errorf("TagResource over the bound: %v", err)
		}
	}
	got, err = s.GetTags(ctx, "A", "arn:race")
	must(t, err)
	if ok != 2 || len(got) != 40 {
		t.Errorf("%d of 4 batches of 20 tags passed and %d tags stored, want 2 and 40", ok, len(got))
	}
}

// quotaRace: 20 concurrent creates against a quota of 5 store exactly 5;
// the check and the insert are one transaction.
func quotaRace(t *testing.T, s store.Store) {
	adm := store.Admission{Defaults: store.Quota{Microvms: 5, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: -1}}
	ok := createRace(t, []store.Store{s}, "race", adm, func(qe *store.QuotaError) {
		if qe.Quota != store.QuotaMicrovms || qe.Limit != 5 || qe.Used != 5 || qe.Requested != 1 {
			t.Errorf("QuotaError = %+v", qe)
		}
	})
	n, err := s.CountMicrovms(ctx, "A")
	must(t, err)
	if ok != 5 || n != 5 {
		t.Fatalf("%d creates succeeded and %d microvms stored, want 5 and 5", ok, n)
	}
}

func quotas(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	none := int64(-1)
	def := store.Quota{Microvms: 10, MemoryMiB: 2048, VCPUs: 3, Builds: 1, StorageBytes: 1000}
	adm := store.Admission{Defaults: def}
	vm := func(id string, mem, cpus int64) store.Microvm {
		m := newVM("A", id, now)
		m.MemoryMiB, m.VCPUs = mem, cpus
		return m
	}
	must(t, s.CreateMicrovmWithinQuota(ctx, vm("m1", 1024, 1), nil, adm))
	must(t, s.CreateMicrovmWithinQuota(ctx, vm("m2", 512, 1), nil, adm))
	var qe *store.QuotaError
	if err := s.CreateMicrovmWithinQuota(ctx, vm("m3", 1024, 1), nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaMemoryMiB || qe.Used != 1536 || qe.Limit != 2048 || qe.Requested != 1024 {
		t.Fatalf("over the memory quota: %v", err)
	}
	if err := s.CreateMicrovmWithinQuota(ctx, vm("m3", 512, 2), nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaVCPUs {
		t.Fatalf("over the vcpu quota: %v", err)
	}
	// A terminated microVM frees its share.
	_, err := s.UpdateMicrovm(ctx, "A", "m1", nil, func(m *store.Microvm) error { m.SetState(store.StateTerminated, "x", now); return nil })
	must(t, err)
	must(t, s.CreateMicrovmWithinQuota(ctx, vm("m3", 1024, 1), nil, adm))
	// Another account is not counted.
	bvm := vm("b1", 2048, 3)
	bvm.Account = "B"
	must(t, s.CreateMicrovmWithinQuota(ctx, bvm, nil, adm))

	u, err := s.QuotaUsage(ctx, "A")
	must(t, err)
	if u.Microvms != 2 || u.MemoryMiB != 1536 || u.VCPUs != 2 {
		t.Errorf("QuotaUsage = %+v", u)
	}

	// An override applies over the defaults, field by field, and persists.
	two := int64(2)
	must(t, s.SetQuotaOverride(ctx, "A", store.QuotaOverride{Microvms: &two, MemoryMiB: &none}))
	o, err := s.GetQuotaOverride(ctx, "A")
	must(t, err)
	if q := o.Apply(def); q.Microvms != 2 || q.MemoryMiB != -1 || q.VCPUs != 3 {
		t.Errorf("override applied = %+v", q)
	}
	if err := s.CreateMicrovmWithinQuota(ctx, vm("m4", 1, 0), nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaMicrovms || qe.Limit != 2 {
		t.Fatalf("over the overridden microvm quota: %v", err)
	}
	all, err := s.ListQuotaOverrides(ctx)
	must(t, err)
	if len(all) != 1 || all["A"].Microvms == nil || *all["A"].Microvms != 2 {
		t.Errorf("ListQuotaOverrides = %v", all)
	}
	must(t, s.SetQuotaOverride(ctx, "A", store.QuotaOverride{}))
	if all, _ := s.ListQuotaOverrides(ctx); len(all) != 0 {
		t.Errorf("an empty override was kept: %v", all)
	}

	// Builds: one concurrent build; a successful build's snapshot counts
	// as storage, and a full account may not start another.
	img, v, b := newImage("A", "q")
	b[0].ID = "q-b1"
	must(t, s.CreateImageWithinQuota(ctx, img, v, b, nil, adm))
	nv := v
	nb := []store.Build{{Account: "A", ImageName: "q", ID: "q-b2", State: store.BuildPending}}
	if _, _, err := s.CreateImageVersionWithinQuota(ctx, nv, nb, nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaBuilds || qe.Used != 1 {
		t.Fatalf("over the build quota: %v", err)
	}
	mem, disk := int64(600), int64(500)
	b[0].State, b[0].Snapshot = store.BuildSuccessful, &store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem, DiskSnapshotSizeInBytes: &disk}
	must(t, s.UpdateBuild(ctx, b[0]))
	u, err = s.QuotaUsage(ctx, "A")
	must(t, err)
	if u.Builds != 0 || u.SnapshotBytes != 1100 || u.StorageBytes != 1100 {
		t.Errorf("QuotaUsage after the build = %+v", u)
	}
	if _, _, err := s.CreateImageVersionWithinQuota(ctx, nv, nb, nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaStorageBytes || qe.Used != 1100 {
		t.Fatalf("over the storage quota: %v", err)
	}
	// Bytes outside the store count too.
	adm.Defaults.StorageBytes = 1200
	if _, _, err := s.CreateImageVersionWithinQuota(ctx, nv, nb, nil, store.Admission{Defaults: adm.Defaults, OtherStorageBytes: 100}); !errors.As(err, &qe) || qe.Quota != store.QuotaStorageBytes || qe.Used != 1200 {
		t.Fatalf("over the storage quota with uploads: %v", err)
	}
	if _, _, err := s.CreateImageVersionWithinQuota(ctx, nv, nb, nil, adm); err != nil {
		t.Fatalf("within quota: %v", err)
	}
	if _, err := s.GetBuild(ctx, "A", "q", "2.0", "q-b2"); err != nil {
		t.Errorf("the admitted version's build: %v", err)
	}
	// A build recorded finished already (a snapshot image's) is no
	// running build, but its storage is needed: refused past the limit,
	// and counted from its insert when admitted.
	snapImg, snapV, snapB := newImage("A", "snap")
	snapB[0].ID, snapB[0].State = "snap-b1", store.BuildSuccessful
	held := int64(150)
	snapB[0].Snapshot = &store.SnapshotBuild{MemorySnapshotSizeInBytes: &held}
	adm.Defaults.StorageBytes, adm.Defaults.Builds = 1249, 0
	if err := s.CreateImageWithinQuota(ctx, snapImg, snapV, snapB, nil, adm); !errors.As(err, &qe) || qe.Quota != store.QuotaStorageBytes || qe.Requested != 150 {
		t.Fatalf("a snapshot over the storage quota: %v", err)
	}
	adm.Defaults.StorageBytes = 1250
	must(t, s.CreateImageWithinQuota(ctx, snapImg, snapV, snapB, nil, adm))
	if u, err = s.QuotaUsage(ctx, "A"); err != nil || u.StorageBytes != 1250 || u.Builds != 1 {
		t.Errorf("QuotaUsage after a snapshot = %+v, %v", u, err)
	}
}

// collect: only TERMINATED records older than the cutoff go (with their
// tags), only tokens older than it, and counts by state are right.
func collect(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	old, recent := now.Add(-48*time.Hour), now.Add(-time.Hour)
	cutoff := now.Add(-24 * time.Hour)
	mk := func(id string, st store.MicrovmState, at time.Time) {
		m := newVM("A", id, at)
		m.ARN = "arn:" + id
		tok := &store.ClientToken{Account: "A", Operation: "RunMicrovm", Token: "tok-" + id, InputHash: "h", ResourceID: id, CreatedAt: at}
		must(t, s.CreateMicrovm(ctx, m, tok))
		must(t, s.TagResource(ctx, "A", m.ARN, map[string]string{"k": "v"}))
		if st != store.StatePending {
			_, err := s.UpdateMicrovm(ctx, "A", id, nil, func(m *store.Microvm) error { m.SetState(st, "test", at); return nil })
			must(t, err)
		}
	}
	mk("old-terminated", store.StateTerminated, old)
	mk("recent-terminated", store.StateTerminated, recent)
	mk("old-suspended", store.StateSuspended, old)
	mk("old-running", store.StateRunning, old)

	counts, err := s.CountMicrovmsByState(ctx)
	must(t, err)
	if counts[store.StateTerminated] != 2 || counts[store.StateSuspended] != 1 || counts[store.StateRunning] != 1 {
		t.Errorf("CountMicrovmsByState = %v", counts)
	}
	n, err := s.DeleteTerminatedMicrovms(ctx, cutoff)
	must(t, err)
	if n != 1 {
		t.Errorf("DeleteTerminatedMicrovms removed %d, want 1", n)
	}
	_, err = s.GetMicrovm(ctx, "A", "old-terminated")
	is(t, err, errdefs.ErrNotFound)
	if tags, _ := s.GetTags(ctx, "A", "arn:old-terminated"); len(tags) != 0 {
		t.Errorf("tags of a deleted microvm stay: %v", tags)
	}
	for _, id := range []string{"recent-terminated", "old-suspended", "old-running"} {
		if _, err := s.GetMicrovm(ctx, "A", id); err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
	n, err = s.DeleteClientTokens(ctx, cutoff)
	must(t, err)
	if n != 3 {
		t.Errorf("DeleteClientTokens removed %d, want 3", n)
	}
	_, err = s.GetClientToken(ctx, "A", "RunMicrovm", "tok-old-running")
	is(t, err, errdefs.ErrNotFound)
	if _, err := s.GetClientToken(ctx, "A", "RunMicrovm", "tok-recent-terminated"); err != nil {
		t.Errorf("recent token: %v", err)
	}

	img, v, b := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v, b, nil))
	img2, v2, b2 := newImage("B", "other")
	must(t, s.CreateImage(ctx, img2, v2, b2, nil))
	vs, next, err := s.ListAllImageVersions(ctx, store.Page{Limit: 1})
	must(t, err)
	if len(vs) != 1 || next == "" {
		t.Fatalf("ListAllImageVersions page 1 = %d, %q", len(vs), next)
	}
	vs2, next, err := s.ListAllImageVersions(ctx, store.Page{Limit: 1, Token: next})
	must(t, err)
	if len(vs2) != 1 || vs2[0].Account == vs[0].Account {
		t.Errorf("ListAllImageVersions page 2 = %+v", vs2)
	}
	if more, _, _ := s.ListAllImageVersions(ctx, store.Page{Limit: 1, Token: next}); next != "" && len(more) != 0 {
		t.Errorf("a third page: %+v", more)
	}
}

// nulBytes: NUL bytes and bytes that are not UTF-8, which a tenant may put
// in a run hook payload, an environment variable, a tag or an error text,
// come back as they went in.
func nulBytes(t *testing.T, s store.Store) {
	const odd = "a\x00b\xff\u0000c"
	now := time.Now().UTC()
	m := newVM("A", "vm", now)
	m.RunHookPayload = "{\"x\":\"\x00\"}\x00"
	m.StateReason = "reason\x00"
	must(t, s.CreateMicrovm(ctx, m, nil))
	got, err := s.GetMicrovm(ctx, "A", "vm")
	must(t, err)
	if got.RunHookPayload != m.RunHookPayload {
		t.Errorf("run hook payload = %q, want %q", got.RunHookPayload, m.RunHookPayload)
	}
	_, err = s.UpdateMicrovm(ctx, "A", "vm", nil, func(m *store.Microvm) error {
		m.SetState(store.StateRunning, "BootFailed: "+odd, now)
		return nil
	})
	must(t, err)
	evs, _, err := s.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventMicrovm, Resource: "vm"}, store.Page{})
	must(t, err)
	if len(evs) != 2 || evs[1].Reason != "BootFailed: "+odd {
		t.Errorf("events = %+v", evs)
	}

	img, v, b := newImage("A", "app")
	v.Config.EnvironmentVariables = map[string]string{"K": "v\x00w"}
	v.StateReason = odd
	must(t, s.CreateImage(ctx, img, v, b, nil))
	gv, err := s.GetImageVersion(ctx, "A", "app", "1")
	must(t, err)
	if gv.Config.EnvironmentVariables["K"] != "v\x00w" {
		t.Errorf("environment = %q", gv.Config.EnvironmentVariables)
	}
	must(t, s.AppendBuildLog(ctx, b[0].ID, []byte(odd)))
	if lg, err := s.ReadBuildLog(ctx, b[0].ID, 0, 100); err != nil || string(lg) != odd {
		t.Errorf("build log = %q, %v", lg, err)
	}

	must(t, s.TagResource(ctx, "A", "arn:x", map[string]string{odd: odd}))
	if tg, err := s.GetTags(ctx, "A", "arn:x"); err != nil || len(tg) != 1 || tg[odd] != odd {
		t.Errorf("tags = %q, %v", tg, err)
	}
	must(t, s.UntagResource(ctx, "A", "arn:x", []string{odd}))
	if tg, _ := s.GetTags(ctx, "A", "arn:x"); len(tg) != 0 {
		t.Errorf("tags after untag = %q", tg)
	}
	k := store.AccessKey{ID: "AKIANUL", Secret: "s\x00", Account: "111111111111", Description: odd, CreatedAt: now}
	must(t, s.CreateAccessKey(ctx, k))
	if gk, err := s.GetAccessKey(ctx, k.ID); err != nil || gk.Description != odd || gk.Secret != k.Secret {
		t.Errorf("access key = %+v, %v", gk, err)
	}
	must(t, s.SetSetting(ctx, "nul", odd))
	if v, err := s.GetSetting(ctx, "nul"); err != nil || v != odd {
		t.Errorf("setting = %q, %v", v, err)
	}
}
