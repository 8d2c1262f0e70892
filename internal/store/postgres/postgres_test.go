//go:build linux

package postgres

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/postgres/pgtest"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/storetest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

var (
	cluster *pgtest.Cluster
	skip    string
)

// TestMain starts one private cluster for the package (see pgtest), except
// under -short (make check), which skips these tests.
func TestMain(m *testing.M) {
	if testenv.Short() {
		skip = "-short: these tests start a PostgreSQL cluster"
		os.Exit(m.Run())
	}
	os.Exit(pgtest.Run(func(c *pgtest.Cluster, why string) int {
		cluster, skip = c, why
		return m.Run()
	}))
}

func sealer(t *testing.T) *seal.Sealer {
	t.Helper()
	s, err := seal.New(bytes.Repeat([]byte{7}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newDB creates an empty database and returns its URL.
func newDB(t *testing.T) string {
	t.Helper()
	if cluster == nil {
		t.Skip(skip)
	}
	url, err := cluster.NewDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return url
}

func open(t *testing.T, url string) *Store {
	t.Helper()
	s, err := Open(context.Background(), url, sealer(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, newDB(t)) })
}

// TestConcurrency runs the two-handle cases on two Stores (two pools)
// opened on one database, as two kiln processes would.
func TestConcurrency(t *testing.T) {
	storetest.Concurrency(t, func(t *testing.T) (store.Store, store.Store) {
		url := newDB(t)
		return open(t, url), open(t, url)
	})
}

// TestMigrations: handles opening an empty database at once apply the
// schema once; reopening applies nothing again and finds the records; a
// newer schema is refused.
func TestMigrations(t *testing.T) {
	ctx := context.Background()
	url := newDB(t)
	errs := make(chan error, 4)
	for i := 0; i < cap(errs); i++ {
		go func() {
			s, err := Open(ctx, url, sealer(t))
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for i := 0; i < cap(errs); i++ {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent open: %v", err)
		}
	}
	s := open(t, url)
	now := time.Now().UTC()
	if err := s.CreateMicrovm(ctx, store.Microvm{ID: "vm", Account: "A", State: store.StateRunning, StartedAt: now, DeadlineAt: now.Add(time.Hour)}, nil); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n != len(migrations) {
		t.Fatalf("schema_migrations rows = %d, %v; want %d", n, err, len(migrations))
	}
	s2 := open(t, url)
	if got, err := s2.GetMicrovm(ctx, "A", "vm"); err != nil || got.State != store.StateRunning {
		t.Fatalf("after reopen: %+v, %v", got, err)
	}
	if _, err := s.pool.Exec(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)`); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, url, sealer(t)); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("opening a newer schema: %v", err)
	}
}

// TestSecretsSealed: the database holds access key secrets sealed, and a
// process with another sealing key cannot open them.
func TestSecretsSealed(t *testing.T) {
	ctx := context.Background()
	url := newDB(t)
	s := open(t, url)
	const secret = "SECRETcreatedThroughTheStoreInterface00"
	if err := s.CreateAccessKey(ctx, store.AccessKey{ID: "AKIA1", Secret: secret, Account: "111111111111", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	var raw string
	if err := s.pool.QueryRow(ctx, `SELECT secret FROM access_keys WHERE id = 'AKIA1'`).Scan(&raw); err != nil {
		t.Fatal(err)
	}
	if !seal.IsSealed(raw) || bytes.Contains([]byte(raw), []byte(secret)) {
		t.Fatalf("stored secret %q is not sealed", raw)
	}
	other, err := seal.New(bytes.Repeat([]byte{8}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	s2, err := Open(ctx, url, other)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.GetAccessKey(ctx, "AKIA1"); err == nil {
		t.Error("a secret opened with another sealing key")
	}
	if _, err := Open(ctx, url, nil); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("open without a sealing key: %v", err)
	}
}

// TestNamesPostgresCannotHold: a NUL in a looked-up name finds nothing
// (as in SQLite) rather than failing the request; stored, it is the
// caller's mistake.
func TestNamesPostgresCannotHold(t *testing.T) {
	ctx := context.Background()
	s := open(t, newDB(t))
	if _, err := s.GetMicrovm(ctx, "A", "vm\x00"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("GetMicrovm with a NUL: %v", err)
	}
	if _, err := s.GetAccessKey(ctx, "AKIA\x00"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("GetAccessKey with a NUL: %v", err)
	}
	now := time.Now().UTC()
	err := s.CreateMicrovm(ctx, store.Microvm{ID: "vm\x00", Account: "A", State: store.StatePending, StartedAt: now, DeadlineAt: now}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("CreateMicrovm with a NUL in the id: %v", err)
	}
}

// TestPlacementSimulation runs storetest.Simulate (1,000 microVMs over 20
// nodes) on PostgreSQL, whose placements take the advisory lock.
func TestPlacementSimulation(t *testing.T) {
	storetest.Simulate(t, open(t, newDB(t)))
}
