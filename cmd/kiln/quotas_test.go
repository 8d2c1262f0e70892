package main

import (
	"context"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestQuotasCommand: `kiln quotas set` changes only the limits given,
// keeps them durably, --reset drops them, and `kiln quotas get` shows the
// recorded server defaults with the account's own limits marked.
func TestQuotasCommand(t *testing.T) {
	dir := t.TempDir()
	old := dataDir
	dataDir = dir
	defer func() { dataDir = old }()
	ctx := context.Background()
	run := cliRunner(t, dir)
	override := func() store.QuotaOverride {
		st, err := openStore(ctx, dir)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		o, err := st.GetQuotaOverride(ctx, "111111111111")
		if err != nil {
			t.Fatal(err)
		}
		return o
	}
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetSetting(ctx, server.SettingQuotaDefaults, `{"microvms":7,"memoryMiB":100,"vcpus":2,"builds":1,"storageBytes":1000}`); err != nil {
		t.Fatal(err)
	}
	st.Close()

	run("quotas", "set", "111111111111", "--microvms", "3", "--memory-mib", "-1")
	out := run("quotas", "set", "111111111111", "--vcpus", "4")
	o := override()
	if o.Microvms == nil || *o.Microvms != 3 || o.MemoryMiB == nil || *o.MemoryMiB != -1 || o.VCPUs == nil || *o.VCPUs != 4 || o.Builds != nil || o.StorageBytes != nil {
		t.Fatalf("override = %+v", o)
	}
	for _, want := range []string{"Microvms          3 (set)", "MemoryMiB         none (set)", "Vcpus             4 (set)", "ConcurrentBuilds  1  ", "StorageBytes      1000  "} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	run("quotas", "set", "111111111111", "--reset")
	if o := override(); o != (store.QuotaOverride{}) {
		t.Errorf("after --reset: %+v", o)
	}
	if out := run("quotas", "get", "111111111111"); !strings.Contains(out, "Microvms          7  ") {
		t.Errorf("get after reset:\n%s", out)
	}
}
