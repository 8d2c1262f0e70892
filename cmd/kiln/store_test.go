//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/store/postgres"
	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestStoreFlag: with --store postgres://... a command that writes the
// store (kiln quotas set) writes the PostgreSQL database, sealed with
// DATA_DIR's key, and creates no kiln.db; a --store that is neither
// sqlite nor a postgres URL is refused without echoing it (it may hold a
// password).
func TestStoreFlag(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts a PostgreSQL cluster")
	}
	if err := pglocal.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	ctx := context.Background()
	c, err := pglocal.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()
	url, err := c.NewDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	oldDir, oldStore := dataDir, storeFlag
	defer func() { dataDir, storeFlag = oldDir, oldStore }()
	run := func(args ...string) error {
		rootCmd.SetOut(&bytes.Buffer{})
		rootCmd.SetArgs(append(args, "--data-dir", dir))
		return rootCmd.ExecuteContext(ctx)
	}
	if err := run("quotas", "set", "111111111111", "--microvms", "3", "--store", url); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "kiln.db")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("kiln.db created with --store postgres: %v", err)
	}
	sl, err := seal.LoadOrCreate(filepath.Join(dir, sqlite.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	st, err := postgres.Open(ctx, url, sl)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	o, err := st.GetQuotaOverride(ctx, "111111111111")
	if err != nil || o.Microvms == nil || *o.Microvms != 3 {
		t.Fatalf("override in postgres = %+v, %v", o, err)
	}
	// kiln keys create --e2b stores the key's hash in PostgreSQL too.
	var out bytes.Buffer
	rootCmd.SetArgs([]string{"keys", "create", "--e2b", "--account", "111111111111", "--store", url, "--data-dir", dir})
	rootCmd.SetOut(&out)
	if err := rootCmd.ExecuteContext(ctx); err != nil {
		t.Fatalf("keys create --e2b with --store postgres: %v", err)
	}
	var created struct{ E2BApiKey, Account string }
	if err := json.Unmarshal(out.Bytes(), &created); err != nil || created.E2BApiKey == "" {
		t.Fatalf("keys create --e2b printed %q: %v", out.String(), err)
	}
	if k, err := st.GetE2BKey(ctx, e2b.HashAPIKey(created.E2BApiKey)); err != nil || k.Account != "111111111111" {
		t.Fatalf("e2b key in postgres = %+v, %v", k, err)
	}
	err = run("quotas", "set", "111111111111", "--microvms", "3", "--store", "postgre://u:hunter2@h/db")
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("a bad --store: %v", err)
	}
	storeFlag = ""
}
