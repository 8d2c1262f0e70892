package e2b

import (
	"testing"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestSnapshotRefusals: what the snapshot routes refuse before any VM
// work, and that a backend that cannot copy a microVM leaves the sandbox
// running as it was (the VM side is test/e2b's snapshots.mjs).
func TestSnapshotRefusals(t *testing.T) {
	e := newEnv(t)
	id := e.create(map[string]any{"templateID": "tmpl", "timeout": 300})

	e.want(e.do(e.key, "POST", "/sandboxes/mvm-0123/snapshots", map[string]any{}), 404, "unknown sandbox")
	e.want(e.do(e.otherKey, "POST", "/sandboxes/"+id+"/snapshots", map[string]any{}), 404, "another account's sandbox")
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/snapshots", map[string]any{"name": "../x"}), 400, "bad name")
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/snapshots", map[string]any{"name": "tmpl"}), 409, "a template's name")
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/fork", map[string]any{"count": 0}), 400, "fork count 0")
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/fork", map[string]any{"count": maxForks + 1}), 400, "fork count too big")
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/fork", map[string]any{"timeout": -1}), 400, "fork timeout")
	e.want(e.do(e.key, "GET", "/snapshots?limit=0", nil), 400, "limit")

	// The fake backend cannot copy a microVM: 501, and the sandbox was
	// paused for the attempt and runs again.
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/snapshots", map[string]any{}), 501, "backend without snapshots")
	var d sandboxDetail
	a := e.do(e.key, "GET", "/sandboxes/"+id, nil)
	e.want(a, 200, "get")
	a.json(t, &d)
	if d.State != "running" {
		t.Fatalf("sandbox is %s after a failed snapshot", d.State)
	}
	var list []snapshotInfo
	a = e.do(e.key, "GET", "/snapshots", nil)
	e.want(a, 200, "list")
	a.json(t, &list)
	if len(list) != 0 {
		t.Fatalf("snapshots after a failed one: %+v", list)
	}
	// Nor is an image left behind.
	var imgs struct{ Items []struct{ Name string } }
	if err := e.srv.op(t.Context(), store.AccessKey{ID: "t", Account: e.account}, "GET", "/microvm-images", nil, nil, &imgs); err != nil {
		t.Fatal(err)
	}
	if len(imgs.Items) != 1 || imgs.Items[0].Name != "tmpl" {
		t.Fatalf("images after a failed snapshot: %+v", imgs.Items)
	}
}
