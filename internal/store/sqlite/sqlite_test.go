package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

// TestConcurrency runs the two-handle cases on two Stores opened on one
// file, as two kiln processes sharing it would.
func TestConcurrency(t *testing.T) {
	storetest.Concurrency(t, func(t *testing.T) (store.Store, store.Store) {
		path := filepath.Join(t.TempDir(), "kiln.db")
		var out [2]store.Store
		for i := range out {
			s, err := Open(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			out[i] = s
		}
		return out[0], out[1]
	})
}

func TestReopenKeepsRecords(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	m := store.Microvm{ID: "vm", Account: "A", State: store.StateRunning, StartedAt: now, DeadlineAt: now.Add(time.Hour)}
	if err := s.CreateMicrovm(ctx, m, nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Reopening applies no migration twice and finds the record.
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.GetMicrovm(ctx, "A", "vm")
	if err != nil || got.State != store.StateRunning {
		t.Fatalf("after reopen: %+v, %v", got, err)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.w.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open(ctx, path); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("opening a newer schema: %v", err)
	}
}

// TestSizeColumnsFilledOnUpgrade: a database an older kiln kept, without
// the size columns the quota now adds up, has them filled from its
// records' documents when this kiln opens it, so the microVMs and
// snapshots it holds still count.
func TestSizeColumnsFilledOnUpgrade(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	w, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	idx := slices.Index(migrations, migrationSizeColumns)
	all := migrations
	migrations = migrations[:idx]
	err = (&Store{w: w}).migrate(ctx)
	migrations = all
	if err != nil {
		t.Fatal(err)
	}
	mem, disk := int64(100), int64(50)
	vm, _ := json.Marshal(store.Microvm{ID: "vm", Account: "A", State: store.StateRunning, MemoryMiB: 512, VCPUs: 2})
	b, _ := json.Marshal(store.Build{ID: "b1", Account: "A", State: store.BuildSuccessful,
		Snapshot: &store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem, DiskSnapshotSizeInBytes: &disk}})
	for _, q := range []struct {
		sql  string
		data []byte
	}{
		{`INSERT INTO microvms (id, account, state, image, version, deadline_at, data) VALUES ('vm', 'A', 'RUNNING', 'app', '1', 0, ?)`, vm},
		{`INSERT INTO builds (build_id, account, image, version, state, data) VALUES ('b1', 'A', 'app', '1', 'SUCCESSFUL', ?)`, b},
	} {
		if _, err := w.ExecContext(ctx, q.sql, string(q.data)); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	u, err := s.QuotaUsage(ctx, "A")
	if err != nil {
		t.Fatal(err)
	}
	if want := (store.QuotaUse{Microvms: 1, MemoryMiB: 512, VCPUs: 2, SnapshotBytes: 150, StorageBytes: 150}); u != want {
		t.Errorf("QuotaUsage after the upgrade = %+v, want %+v", u, want)
	}
}

// TestSecretsSealedAtRest: a copy of the database files (kiln.db, its WAL
// and SHM) holds no secret in clear, including secrets an older kiln
// stored in clear before this one opened the database; and the files are
// 0600.
func TestSecretsSealedAtRest(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "kiln.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	const oldSecret = "OLDplaintextSECRETwrittenByAnOlderKiln00"
	const newSecret = "NEWsecretCreatedThroughTheStoreInterface"
	// What kiln before sealing wrote: the secret in clear.
	if _, err := s.w.ExecContext(ctx, `INSERT INTO access_keys (id, secret, account, description, created_at) VALUES ('AKIAOLD', ?, '111111111111', '', 1)`, oldSecret); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateAccessKey(ctx, store.AccessKey{ID: "AKIANEW", Secret: newSecret, Account: "111111111111", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{"AKIAOLD": oldSecret, "AKIANEW": newSecret} {
		k, err := s.GetAccessKey(ctx, id)
		if err != nil || k.Secret != want {
			t.Fatalf("GetAccessKey(%s) = %q, %v", id, k.Secret, err)
		}
	}
	// What a change frees is zeroed in the pages it rewrites (2: FAST).
	var sd int
	if err := s.w.QueryRowContext(ctx, `PRAGMA secure_delete`).Scan(&sd); err != nil || sd != 2 {
		t.Errorf("secure_delete = %d, %v", sd, err)
	}
	// Read the files while the store is open, as a thief copying them would.
	for _, suffix := range []string{"", "-wal", "-shm"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && suffix != "" {
				continue
			}
			t.Fatal(err)
		}
		for _, sec := range []string{oldSecret, newSecret} {
			if bytes.Contains(b, []byte(sec)) {
				t.Errorf("kiln.db%s holds the secret %s in clear", suffix, sec)
			}
		}
		fi, _ := os.Stat(path + suffix)
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("kiln.db%s mode %v, want 0600", suffix, fi.Mode().Perm())
		}
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("sealing key: %v, %v", fi, err)
	}
	// Without the key file the secrets do not open.
	other, err := seal.LoadOrCreate(filepath.Join(t.TempDir(), "other.key"))
	if err != nil {
		t.Fatal(err)
	}
	s2, err := Open(ctx, path, WithSealer(other))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.GetAccessKey(ctx, "AKIANEW"); err == nil {
		t.Error("a secret opened with another sealing key")
	}
}

// TestModesRestored: files left group/world-readable by an older kiln are
// brought back to 0600 on open.
func TestModesRestored(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	os.Chmod(path, 0o644)
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v", p, fi.Mode().Perm())
		}
	}
}

// TestBuildLogLeavesWriterFull: a build log chunk commits with
// synchronous=NORMAL, and the writer connection is back at FULL for every
// other commit after it.
func TestBuildLogLeavesWriterFull(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 3; i++ {
		if err := s.AppendBuildLog(ctx, "b", []byte("line\n")); err != nil {
			t.Fatal(err)
		}
	}
	var mode int
	if err := s.w.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if mode != 2 {
		t.Fatalf("writer synchronous = %d after build log appends, want 2 (FULL)", mode)
	}
	if got, _ := s.ReadBuildLog(ctx, "b", 0, 100); string(got) != "line\nline\nline\n" {
		t.Errorf("log = %q", got)
	}
}

// TestNodeColumnFilledOnUpgrade: the records of a database kept before the
// node column keep the node their documents name, so a node reconciling
// after the upgrade finds its microVMs and placement counts their memory.
func TestNodeColumnFilledOnUpgrade(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kiln.db")
	w, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	all := migrations
	migrations = migrations[:slices.Index(migrations, migrationCluster)]
	err = (&Store{w: w}).migrate(ctx)
	migrations = all
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []store.Microvm{
		{ID: "placed", Account: "A", State: store.StateRunning, MemoryMiB: 512, Node: "n1"},
		{ID: "local", Account: "A", State: store.StateRunning, MemoryMiB: 512},
	} {
		data, _ := json.Marshal(m)
		if _, err := w.ExecContext(ctx, `INSERT INTO microvms (id, account, state, image, version, deadline_at, memory_mib, data) VALUES (?, 'A', 'RUNNING', 'app', '1', 0, 512, ?)`,
			m.ID, string(data)); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	vms, err := s.ListNodeMicrovms(ctx, "n1")
	if err != nil || len(vms) != 1 || vms[0].ID != "placed" {
		t.Fatalf("ListNodeMicrovms(n1) after the upgrade = %+v, %v", vms, err)
	}
	n, err := s.RegisterNode(ctx, store.Node{Name: "n1", CapacityMiB: 1024, LeaseExpiresAt: time.Now().Add(time.Minute)})
	if err != nil || n.CommittedMiB != 512 {
		t.Fatalf("RegisterNode after the upgrade = %+v, %v; want 512 MiB committed", n, err)
	}
}

// TestPlacementSimulation runs storetest.Simulate (1,000 microVMs over 20
// nodes) on a SQLite store.
func TestPlacementSimulation(t *testing.T) {
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	storetest.Simulate(t, s)
}
