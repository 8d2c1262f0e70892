package storetest

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// e2bKeys: every store keeps E2B API keys (by hash), with a description
// the operator chose coming back as it went in; a hash stored twice is a
// conflict, and an unknown one (or one no key can have) is not found.
func e2bKeys(t *testing.T, s store.Store) {
	const odd = "a\x00b\xff"
	now := time.Now().UTC().Truncate(time.Microsecond)
	k := store.E2BKey{Hash: "ab12", Account: "111111111111", Prefix: "e2b_0123ab", Description: "ci " + odd, CreatedAt: now}
	must(t, s.CreateE2BKey(ctx, k))
	got, err := s.GetE2BKey(ctx, k.Hash)
	must(t, err)
	if !got.CreatedAt.Equal(k.CreatedAt) {
		t.Errorf("GetE2BKey created at %v, want %v", got.CreatedAt, k.CreatedAt)
	}
	got.CreatedAt = k.CreatedAt
	if got != k {
		t.Errorf("GetE2BKey = %+v, want %+v", got, k)
	}
	is(t, s.CreateE2BKey(ctx, store.E2BKey{Hash: k.Hash, Account: "222222222222", CreatedAt: now}), errdefs.ErrConflict)
	if got, _ := s.GetE2BKey(ctx, k.Hash); got.Account != k.Account {
		t.Errorf("a second key with the hash replaced the first: %+v", got)
	}
	_, err = s.GetE2BKey(ctx, "cd34")
	is(t, err, errdefs.ErrNotFound)
	_, err = s.GetE2BKey(ctx, "ab\x0012")
	is(t, err, errdefs.ErrNotFound)
}

// e2bSandboxes: a store that keeps E2B sandboxes returns them to their
// account only, never lets another account's Put replace one, lists those
// whose microVM is not TERMINATED (oldest first, at most limit), and drops
// a sandbox's record with its microVM's.
func e2bSandboxes(t *testing.T, s store.Store) {
	es, ok := s.(store.E2BStore)
	if !ok {
		t.Skip("this store keeps no E2B sandboxes")
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	for i, id := range []string{"sb1", "sb2", "sb3"} {
		at := now.Add(time.Duration(i) * time.Second)
		must(t, s.CreateMicrovm(ctx, newVM("A", id, at), nil))
		must(t, es.PutE2BSandbox(ctx, store.E2BSandbox{ID: id, Account: "A", TemplateID: "tpl",
			Metadata: map[string]string{"k": "v\x00"}, EnvVars: map[string]string{"E": id}, CreatedAt: at}))
	}
	got, err := es.GetE2BSandbox(ctx, "A", "sb1")
	must(t, err)
	if got.TemplateID != "tpl" || got.Metadata["k"] != "v\x00" || got.EnvVars["E"] != "sb1" || !got.CreatedAt.Equal(now) {
		t.Errorf("GetE2BSandbox = %+v", got)
	}
	_, err = es.GetE2BSandbox(ctx, "B", "sb1")
	is(t, err, errdefs.ErrNotFound)
	// Another account's record under the same id changes nothing.
	must(t, es.PutE2BSandbox(ctx, store.E2BSandbox{ID: "sb1", Account: "B", TemplateID: "evil", CreatedAt: now}))
	if got, _ := es.GetE2BSandbox(ctx, "A", "sb1"); got.TemplateID != "tpl" {
		t.Errorf("another account replaced a sandbox: %+v", got)
	}
	// The owner's replaces it.
	must(t, es.PutE2BSandbox(ctx, store.E2BSandbox{ID: "sb1", Account: "A", TemplateID: "tpl2", CreatedAt: now}))
	if got, _ := es.GetE2BSandbox(ctx, "A", "sb1"); got.TemplateID != "tpl2" {
		t.Errorf("the owner's Put did not replace the sandbox: %+v", got)
	}

	_, err = s.UpdateMicrovm(ctx, "A", "sb2", nil, func(m *store.Microvm) error {
		m.SetState(store.StateTerminated, "", now)
		return nil
	})
	must(t, err)
	list, err := es.ListE2BSandboxes(ctx, "A", 10)
	must(t, err)
	if len(list) != 2 || list[0].ID != "sb1" || list[1].ID != "sb3" {
		t.Errorf("ListE2BSandboxes = %+v, want sb1, sb3", list)
	}
	if list, _ := es.ListE2BSandboxes(ctx, "A", 1); len(list) != 1 || list[0].ID != "sb1" {
		t.Errorf("ListE2BSandboxes limit 1 = %+v", list)
	}
	if list, _ := es.ListE2BSandboxes(ctx, "B", 10); len(list) != 0 {
		t.Errorf("another account lists %+v", list)
	}

	// Garbage collection of the terminated record takes the sandbox too.
	n, err := s.DeleteTerminatedMicrovms(ctx, now.Add(time.Hour))
	must(t, err)
	if n != 1 {
		t.Fatalf("DeleteTerminatedMicrovms = %d, want 1", n)
	}
	_, err = es.GetE2BSandbox(ctx, "A", "sb2")
	is(t, err, errdefs.ErrNotFound)
}

// e2bStore returns s's E2B store, or skips the test.
func e2bStore(t *testing.T, s store.Store) store.E2BStore {
	es, ok := s.(store.E2BStore)
	if !ok {
		t.Skip("this store keeps no E2B records")
	}
	return es
}

// tagMap is the template's tags as tag → build id.
func tagMap(t *testing.T, es store.E2BStore, account, template string) map[string]string {
	t.Helper()
	list, err := es.ListE2BTags(ctx, account, template)
	must(t, err)
	m := map[string]string{}
	for i, tg := range list {
		if i > 0 && list[i-1].Tag >= tg.Tag {
			t.Errorf("ListE2BTags not by tag: %+v", list)
		}
		m[tg.Tag] = tg.BuildID
	}
	return m
}

// e2bTags: a template's tags are its account's: assigned and moved in one
// call, removed all or none, bounded (a call that would pass the bound
// changes nothing), and gone with the template's image.
func e2bTags(t *testing.T, s store.Store) {
	es := e2bStore(t, s)
	now := time.Now().UTC().Truncate(time.Microsecond)
	img, v, b := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v, b, nil))
	must(t, es.AssignE2BTags(ctx, "A", "app", []string{"v1", "prod"}, "b1", "1", now))
	must(t, es.AssignE2BTags(ctx, "A", "app", []string{"v2", "prod"}, "b2", "2", now.Add(time.Second)))
	if got := tagMap(t, es, "A", "app"); len(got) != 3 || got["v1"] != "b1" || got["v2"] != "b2" || got["prod"] != "b2" {
		t.Errorf("tags = %v", got)
	}
	tg, err := es.GetE2BTag(ctx, "A", "app", "prod")
	must(t, err)
	if tg != (store.E2BTag{Tag: "prod", BuildID: "b2", Version: "2", CreatedAt: now.Add(time.Second)}) {
		t.Errorf("GetE2BTag = %+v", tg)
	}

	// Another account (a hostile tenant naming the same template) neither
	// sees nor removes them, and its own tags are apart.
	_, err = es.GetE2BTag(ctx, "B", "app", "prod")
	is(t, err, errdefs.ErrNotFound)
	is(t, es.RemoveE2BTags(ctx, "B", "app", []string{"prod"}), errdefs.ErrNotFound)
	must(t, es.AssignE2BTags(ctx, "B", "app", []string{"prod"}, "evil", "9", now))
	if got := tagMap(t, es, "A", "app"); got["prod"] != "b2" || len(got) != 3 {
		t.Errorf("another account's assignment changed the tags: %v", got)
	}
	_, err = es.GetE2BTag(ctx, "A\x00", "app", "prod")
	is(t, err, errdefs.ErrNotFound)

	// Removal is all or none.
	is(t, es.RemoveE2BTags(ctx, "A", "app", []string{"v1", "nope"}), errdefs.ErrNotFound)
	if got := tagMap(t, es, "A", "app"); got["v1"] != "b1" {
		t.Errorf("a refused removal removed v1: %v", got)
	}
	must(t, es.RemoveE2BTags(ctx, "A", "app", []string{"v1", "v2"}))
	if got := tagMap(t, es, "A", "app"); len(got) != 1 || got["prod"] != "b2" {
		t.Errorf("after removal: %v", got)
	}

	// The bound: a call that would pass it assigns none of its tags.
	var many []string
	for i := range store.MaxE2BTags - 1 {
		many = append(many, fmt.Sprintf("t%02d", i))
	}
	must(t, es.AssignE2BTags(ctx, "A", "app", many, "b3", "3", now))
	is(t, es.AssignE2BTags(ctx, "A", "app", []string{"x", "y"}, "b3", "3", now), errdefs.ErrExhausted)
	if got := tagMap(t, es, "A", "app"); len(got) != store.MaxE2BTags || got["x"] != "" {
		t.Errorf("after a refused assignment: %d tags, x=%q", len(got), got["x"])
	}
	// Moving a tag adds none.
	must(t, es.AssignE2BTags(ctx, "A", "app", []string{"prod"}, "b3", "3", now))

	// Deleting the image drops its tags, and only its account's.
	must(t, s.DeleteImage(ctx, "A", "app"))
	if got := tagMap(t, es, "A", "app"); len(got) != 0 {
		t.Errorf("tags after the image was deleted: %v", got)
	}
	if got := tagMap(t, es, "B", "app"); got["prod"] != "evil" {
		t.Errorf("deleting A's image dropped B's tags: %v", got)
	}
}

// e2bBuilds: a template build is its account's, started once, found by
// the version it made, and dropped with its image once started.
func e2bBuilds(t *testing.T, s store.Store) {
	es := e2bStore(t, s)
	now := time.Now().UTC().Truncate(time.Microsecond)
	b := store.E2BBuild{ID: "0001", Account: "A", Template: "app", Tags: []string{"v1"}, MemoryMB: 1024, CPUCount: 2, CreatedAt: now}
	must(t, es.CreateE2BBuild(ctx, b))
	is(t, es.CreateE2BBuild(ctx, b), errdefs.ErrConflict)
	// The same id in another account is another build.
	must(t, es.CreateE2BBuild(ctx, store.E2BBuild{ID: "0001", Account: "B", Template: "evil", CreatedAt: now}))
	got, err := es.GetE2BBuild(ctx, "A", "0001")
	must(t, err)
	if got.Template != "app" || got.MemoryMB != 1024 || got.CPUCount != 2 || len(got.Tags) != 1 || got.Version != "" || !got.CreatedAt.Equal(now) {
		t.Errorf("GetE2BBuild = %+v", got)
	}
	_, err = es.GetE2BBuild(ctx, "C", "0001")
	is(t, err, errdefs.ErrNotFound)

	must(t, es.StartE2BBuild(ctx, "A", "0001", "1"))
	is(t, es.StartE2BBuild(ctx, "A", "0001", "2"), errdefs.ErrConflict)
	is(t, es.StartE2BBuild(ctx, "A", "0002", "2"), errdefs.ErrNotFound)
	if got, _ := es.GetE2BBuild(ctx, "B", "0001"); got.Version != "" {
		t.Errorf("starting A's build started B's: %+v", got)
	}
	of, err := es.E2BBuildOfVersion(ctx, "A", "app", "1")
	must(t, err)
	if of.ID != "0001" || of.Version != "1" {
		t.Errorf("E2BBuildOfVersion = %+v", of)
	}
	for _, c := range [][3]string{{"B", "app", "1"}, {"A", "app", "2"}, {"A", "other", "1"}, {"A", "app", ""}} {
		_, err := es.E2BBuildOfVersion(ctx, c[0], c[1], c[2])
		is(t, err, errdefs.ErrNotFound)
	}

	// Deleting the image drops its started builds; one not started yet
	// (requested for a template that does not exist yet) stays.
	img, v, bs := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v, bs, nil))
	must(t, es.CreateE2BBuild(ctx, store.E2BBuild{ID: "0003", Account: "A", Template: "app", CreatedAt: now}))
	must(t, s.DeleteImage(ctx, "A", "app"))
	_, err = es.GetE2BBuild(ctx, "A", "0001")
	is(t, err, errdefs.ErrNotFound)
	_, err = es.GetE2BBuild(ctx, "A", "0003")
	must(t, err)
}

// e2bSnapshots: a snapshot record is its account's, read while its image
// exists, listed oldest first by sandbox or name in pages, and gone with
// its image.
func e2bSnapshots(t *testing.T, s store.Store) {
	es := e2bStore(t, s)
	now := time.Now().UTC().Truncate(time.Microsecond)
	for i, name := range []string{"snap-c", "snap-a", "snap-b"} {
		img, v, b := newImage("A", name)
		b[0].ID = name + "-build"
		must(t, s.CreateImage(ctx, img, v, b, nil))
		sb := "sb1"
		if i == 2 {
			sb = "sb2"
		}
		// snap-a and snap-b are as old: the name orders them.
		at := now.Add(time.Duration(min(i, 1)) * time.Second)
		must(t, es.PutE2BSnapshot(ctx, store.E2BSnapshot{Account: "A", Name: name, SandboxID: sb, TemplateID: "base",
			EnvVars: map[string]string{"K": "v\x00"}, CreatedAt: at}))
	}
	// A record whose image does not exist is no snapshot.
	must(t, es.PutE2BSnapshot(ctx, store.E2BSnapshot{Account: "A", Name: "ghost", SandboxID: "sb1", CreatedAt: now}))
	_, err := es.GetE2BSnapshot(ctx, "A", "ghost")
	is(t, err, errdefs.ErrNotFound)

	got, err := es.GetE2BSnapshot(ctx, "A", "snap-c")
	must(t, err)
	if got.SandboxID != "sb1" || got.TemplateID != "base" || got.EnvVars["K"] != "v\x00" || !got.CreatedAt.Equal(now) {
		t.Errorf("GetE2BSnapshot = %+v", got)
	}
	_, err = es.GetE2BSnapshot(ctx, "B", "snap-c")
	is(t, err, errdefs.ErrNotFound)
	// Another account's record of the name is its own, not A's.
	must(t, es.PutE2BSnapshot(ctx, store.E2BSnapshot{Account: "B", Name: "snap-c", SandboxID: "evil", CreatedAt: now}))
	if got, _ := es.GetE2BSnapshot(ctx, "A", "snap-c"); got.SandboxID != "sb1" {
		t.Errorf("another account replaced a snapshot: %+v", got)
	}

	names := func(q store.E2BSnapshotQuery) []string {
		t.Helper()
		list, err := es.ListE2BSnapshots(ctx, "A", q)
		must(t, err)
		var out []string
		for _, sn := range list {
			out = append(out, sn.Name)
		}
		return out
	}
	for _, c := range []struct {
		q    store.E2BSnapshotQuery
		want string
	}{
		{store.E2BSnapshotQuery{Limit: 10}, "[snap-c snap-a snap-b]"},
		{store.E2BSnapshotQuery{Limit: 2}, "[snap-c snap-a]"},
		{store.E2BSnapshotQuery{After: "snap-a", Limit: 2}, "[snap-b]"},
		{store.E2BSnapshotQuery{After: "snap-c", Limit: 1}, "[snap-a]"},
		{store.E2BSnapshotQuery{After: "gone", Limit: 10}, "[]"},
		{store.E2BSnapshotQuery{SandboxID: "sb1", Limit: 10}, "[snap-c snap-a]"},
		{store.E2BSnapshotQuery{Name: "snap-b", Limit: 10}, "[snap-b]"},
	} {
		if got := fmt.Sprint(names(c.q)); got != c.want {
			t.Errorf("ListE2BSnapshots(%+v) = %s, want %s", c.q, got, c.want)
		}
	}
	if list, _ := es.ListE2BSnapshots(ctx, "B", store.E2BSnapshotQuery{Limit: 10}); len(list) != 0 {
		t.Errorf("another account lists %+v", list)
	}

	must(t, es.DeleteE2BSnapshot(ctx, "A", "snap-a"))
	must(t, es.DeleteE2BSnapshot(ctx, "A", "snap-a"))
	// Deleting the image takes the record.
	must(t, s.DeleteImage(ctx, "A", "snap-b"))
	if got := fmt.Sprint(names(store.E2BSnapshotQuery{Limit: 10})); got != "[snap-c]" {
		t.Errorf("after deletes: %s", got)
	}
}

// e2bAcrossHandles: what one replica records (tags, builds, snapshots)
// the other reads, and tags assigned at once through both are all kept
// (no update lost) without passing the bound together.
func e2bAcrossHandles(t *testing.T, a, b store.Store) {
	ea, eb := e2bStore(t, a), e2bStore(t, b)
	now := time.Now().UTC().Truncate(time.Microsecond)
	for _, name := range []string{"app", "snap"} {
		img, v, bs := newImage("A", name)
		bs[0].ID = name + "-build"
		must(t, a.CreateImage(ctx, img, v, bs, nil))
	}
	must(t, ea.AssignE2BTags(ctx, "A", "app", []string{"prod"}, "b1", "1", now))
	if tg, err := eb.GetE2BTag(ctx, "A", "app", "prod"); err != nil || tg.BuildID != "b1" {
		t.Errorf("the other handle reads tag prod as %+v, %v", tg, err)
	}
	must(t, ea.CreateE2BBuild(ctx, store.E2BBuild{ID: "0001", Account: "A", Template: "app", CreatedAt: now}))
	must(t, eb.StartE2BBuild(ctx, "A", "0001", "1"))
	is(t, ea.StartE2BBuild(ctx, "A", "0001", "2"), errdefs.ErrConflict)
	must(t, ea.PutE2BSnapshot(ctx, store.E2BSnapshot{Account: "A", Name: "snap", SandboxID: "sb1", CreatedAt: now}))
	if list, err := eb.ListE2BSnapshots(ctx, "A", store.E2BSnapshotQuery{Limit: 10}); err != nil || len(list) != 1 || list[0].Name != "snap" {
		t.Errorf("the other handle lists snapshots %+v, %v", list, err)
	}

	// Distinct tags assigned at once through both handles: every one
	// stays, up to the bound exactly; the rest are refused, none half-done.
	handles := []store.E2BStore{ea, eb}
	const n = store.MaxE2BTags + 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = handles[i%2].AssignE2BTags(ctx, "A", "app", []string{fmt.Sprintf("c%02d", i)}, "b1", "1", now)
		}()
	}
	wg.Wait()
	got := tagMap(t, ea, "A", "app")
	if len(got) != store.MaxE2BTags {
		t.Errorf("%d tags after concurrent assignments, want the bound %d", len(got), store.MaxE2BTags)
	}
	refused := 0
	for i, err := range errs {
		_, kept := got[fmt.Sprintf("c%02d", i)]
		switch {
		case err == nil && !kept:
			t.Errorf("assignment %d succeeded but its tag was lost", i)
		case err != nil && !errors.Is(err, errdefs.ErrExhausted):
			t.Errorf("assignment %d: %v", i, err)
		case err != nil && kept:
			t.Errorf("assignment %d was refused but its tag stayed", i)
		case err != nil:
			refused++
		}
	}
	// prod was there before: n assignments, bound-1 of them fit.
	if refused != n-(store.MaxE2BTags-1) {
		t.Errorf("%d assignments refused, want %d", refused, n-(store.MaxE2BTags-1))
	}
}
