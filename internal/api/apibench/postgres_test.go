//go:build linux

package apibench

import (
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
)

// TestRunPostgres: --store postgres measures SQLite, then PostgreSQL in a
// private cluster, in one run, without errors.
func TestRunPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts a PostgreSQL cluster")
	}
	if err := pglocal.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	res, err := Run(context.Background(), Options{Clients: 4, Records: 50, Duration: 200 * time.Millisecond, PageSize: 10, Dir: t.TempDir(), Store: "postgres"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	stores := map[string]int{}
	for _, r := range res {
		stores[r.Store]++
		if r.Requests == 0 || r.Errors != 0 {
			t.Errorf("%s %s: %d requests, %d errors", r.Store, r.Operation, r.Requests, r.Errors)
		}
	}
	if stores["sqlite"] != 3 || stores["postgres"] != 3 {
		t.Errorf("results per store = %v", stores)
	}
}
