//go:build linux

package gc

import (
	"bytes"
	"context"
	"os"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/store/postgres"
	"github.com/kiln-sandbox/kiln/internal/store/postgres/pgtest"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

var (
	pgCluster *pgtest.Cluster
	pgSkip    = "-short: these tests start a PostgreSQL cluster"
)

// TestMain starts one private PostgreSQL cluster for the package (see
// pgtest), except under -short (make check).
func TestMain(m *testing.M) {
	if testenv.Short() {
		os.Exit(m.Run())
	}
	os.Exit(pgtest.Run(func(c *pgtest.Cluster, why string) int {
		pgCluster, pgSkip = c, why
		return m.Run()
	}))
}

func TestCollectorExpiresStoredTemplateFilesPostgres(t *testing.T) {
	if pgCluster == nil {
		t.Skip(pgSkip)
	}
	ctx := context.Background()
	url, err := pgCluster.NewDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sealer, err := seal.New(bytes.Repeat([]byte{7}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	st, err := postgres.Open(ctx, url, sealer)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	expireStoredTemplateFiles(t, st)
}
