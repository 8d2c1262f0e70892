package storetest

import (
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
