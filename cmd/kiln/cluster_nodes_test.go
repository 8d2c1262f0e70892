package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestClusterNodesCommand: `kiln cluster nodes|cordon|uncordon` on a real
// SQLite store: the list shows state, cordon, committed/capacity and the
// lease; cordon and uncordon change what placement sees; an unknown node
// is an error.
func TestClusterNodesCommand(t *testing.T) {
	dir := t.TempDir()
	old := dataDir
	dataDir = dir
	defer func() { dataDir = old }()
	ctx := context.Background()
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	cs := st.(store.Cluster)
	now := time.Now()
	for _, n := range []store.Node{
		{Name: "alpha", RPCAddr: "a:7070", Platform: "p", CapacityMiB: 4096, LeaseExpiresAt: now.Add(time.Minute)},
		{Name: "beta", RPCAddr: "b:7070", Platform: "p", CapacityMiB: 2048, LeaseExpiresAt: now.Add(-time.Hour)},
	} {
		if _, err := cs.RegisterNode(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	vm := store.Microvm{ID: "vm1", Account: "111111111111", State: store.StatePending, ImageName: "app", ImageVersion: "1",
		MemoryMiB: 512, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(time.Hour), MaximumDurationInSeconds: 3600}
	if err := st.CreateMicrovm(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	if _, n, err := cs.PlaceMicrovm(ctx, vm.Account, vm.ID, store.Placement{MemoryMiB: 512, Platform: "p", Now: now}); err != nil || n.Name != "alpha" {
		t.Fatalf("placed on %q: %v", n.Name, err)
	}
	st.Close()

	run := cliRunner(t, dir)
	out := run("cluster", "nodes")
	for _, re := range []string{
		`NAME\s+STATE\s+CORDONED\s+COMMITTED/CAPACITY MiB\s+LEASE`,
		`alpha\s+ACTIVE\s+no\s+512/4096\s+expires in (59s|1m0s)`,
		`beta\s+ACTIVE\s+no\s+0/2048\s+expired 1h0m[01]s ago`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("kiln cluster nodes: no line like %s:\n%s", re, out)
		}
	}
	if out := run("cluster", "cordon", "alpha"); !regexp.MustCompile(`alpha\s+ACTIVE\s+yes\s`).MatchString(out) {
		t.Errorf("cordon:\n%s", out)
	}
	// Placement sees it: the only live node is cordoned.
	st, err = openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	vm.ID = "vm2"
	if err := st.CreateMicrovm(ctx, vm, nil); err != nil {
		t.Fatal(err)
	}
	if _, n, err := st.(store.Cluster).PlaceMicrovm(ctx, vm.Account, vm.ID, store.Placement{MemoryMiB: 512, Platform: "p", Now: time.Now()}); err == nil {
		t.Errorf("placed on cordoned %s", n.Name)
	}
	st.Close()
	if out := run("cluster", "uncordon", "alpha"); !regexp.MustCompile(`alpha\s+ACTIVE\s+no\s`).MatchString(out) {
		t.Errorf("uncordon:\n%s", out)
	}
	if _, err := runFresh(t, dir, "cluster", "cordon", "nope"); err == nil || !strings.Contains(err.Error(), "not") {
		t.Errorf("cordon of an unknown node: %v", err)
	}
}

// TestOperatorKeyFiles: --sealing-key and --token-key are the operator's
// files (a read-only Kubernetes Secret): used as they are, never
// rewritten or chmodded; a key sealed by one process is unsealed by
// another that is given the same file; a missing file is an error that
// says how to make one, not a new random key.
func TestOperatorKeyFiles(t *testing.T) {
	secrets := t.TempDir()
	sealKey := filepath.Join(secrets, "secrets.key")
	if err := os.WriteFile(sealKey, []byte(strings.Repeat("k", 32)), 0o440); err != nil {
		t.Fatal(err)
	}
	defer func() { sealingKeyFlag = "" }()
	sealingKeyFlag = sealKey
	ctx := context.Background()
	out, err := runFresh(t, t.TempDir(), "keys", "create", "--account", "111111111111")
	if err != nil {
		t.Fatalf("keys create with --sealing-key: %v\n%s", err, out)
	}
	if fi, err := os.Stat(sealKey); err != nil || fi.Mode().Perm() != 0o440 {
		t.Errorf("--sealing-key file mode changed: %v %v", fi.Mode(), err)
	}
	// Two data dirs (two control replicas) on one store: a SQLite file
	// stands for PostgreSQL; the second replica has the same key file.
	a := t.TempDir()
	st, err := openStore(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	k, err := auth.NewAccessKey("111111111111", "test")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAccessKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	st.Close()
	b := t.TempDir()
	if err := os.Link(filepath.Join(a, "kiln.db"), filepath.Join(b, "kiln.db")); err != nil {
		t.Fatal(err)
	}
	st, err = openStore(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := st.GetAccessKey(ctx, k.ID)
	st.Close()
	if err != nil || got.Secret != k.Secret {
		t.Fatalf("the other replica unsealed %q (%v), want the secret", got.Secret, err)
	}
	if _, err := os.Stat(filepath.Join(b, "secrets.key")); err == nil {
		t.Error("DATA_DIR/secrets.key made although --sealing-key was given")
	}

	sealingKeyFlag = filepath.Join(secrets, "missing")
	if _, err := openStore(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "head -c 32") {
		t.Errorf("missing --sealing-key: %v", err)
	}
	os.WriteFile(filepath.Join(secrets, "short"), []byte("short"), 0o400)
	sealingKeyFlag = filepath.Join(secrets, "short")
	if _, err := openStore(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "32") {
		t.Errorf("short --sealing-key: %v", err)
	}

	// --token-key: read as is; missing is an error, not a new key.
	tok := filepath.Join(secrets, "token.key")
	os.WriteFile(tok, []byte(strings.Repeat("t", 32)), 0o440)
	if key, err := server.LoadTokenKey(server.Options{DataDir: t.TempDir(), TokenKey: tok}); err != nil || string(key) != strings.Repeat("t", 32) {
		t.Errorf("--token-key: %q %v", key, err)
	}
	if _, err := server.LoadTokenKey(server.Options{DataDir: t.TempDir(), TokenKey: filepath.Join(secrets, "none")}); err == nil || !strings.Contains(err.Error(), "every control replica and edge") {
		t.Errorf("missing --token-key: %v", err)
	}
}
