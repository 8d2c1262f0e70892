package api_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// copier is the fake backend with lifecycle.Snapshotter: each copy takes
// a moment (so that concurrent ones overlap) and reports a 1 GiB memory
// (more than the 64 MiB the fake build recorded, as a template built for
// a larger size would) and a 100 MiB disk.
type copier struct{ *fakebackend.Backend }

const copiedMem, copiedDisk = int64(1 << 30), int64(100 << 20)

func (copier) SnapshotMicrovm(ctx context.Context, _ store.Microvm, _, _ string) (store.SnapshotBuild, error) {
	select {
	case <-time.After(50 * time.Millisecond):
	case <-ctx.Done():
		return store.SnapshotBuild{}, ctx.Err()
	}
	mem, disk := copiedMem, copiedDisk
	return store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem, DiskSnapshotSizeInBytes: &disk}, nil
}

// TestSnapshotQuota: a snapshot image counts toward the account's
// storage quota like a built one (its memory reserved before the copy,
// so concurrent snapshots cannot together pass the limit), and microVMs
// run from it are charged the memory the snapshot holds. Before, a
// snapshot had no build record: it was neither checked nor counted, and
// its microVMs were charged the first resources entry.
func TestSnapshotQuota(t *testing.T) {
	e := newEnvBackend(t, func(b *fakebackend.Backend) lifecycle.Backend { return copier{b} }, func(c *api.Config) {
		c.Quota = api.DefaultQuota
	})
	ctx := context.Background()
	acct := e.key.Account
	e.readyImage("app") // 64 MiB memory and a 256 MiB disk
	built := int64(64<<20 + 256<<20)
	id := e.runningVM(map[string]any{"imageIdentifier": "app"})
	e.ok("POST", base+"/microvms/"+id+"/suspend", nil, nil)
	e.waitField(base+"/microvms/"+id, "state", "SUSPENDED")
	storage := func() int64 {
		t.Helper()
		_, u, err := e.srv.Quota(ctx, acct)
		if err != nil {
			t.Fatal(err)
		}
		return u.StorageBytes
	}
	if got := storage(); got != built {
		t.Fatalf("storage in use %d, want %d", got, built)
	}
	setStorage := func(n int64) {
		t.Helper()
		if err := e.st.SetQuotaOverride(ctx, acct, store.QuotaOverride{StorageBytes: &n}); err != nil {
			t.Fatal(err)
		}
	}

	// Over the quota: refused before any copy, and no image is left.
	setStorage(built + 32<<20)
	_, err := e.srv.SnapshotMicrovmImage(ctx, acct, id, "over")
	var qe *store.QuotaError
	if !errors.As(err, &qe) || qe.Quota != store.QuotaStorageBytes || qe.Requested != 64<<20 {
		t.Fatalf("snapshot over the storage quota: %v", err)
	}
	if _, err := e.st.GetImage(ctx, acct, "over"); err == nil {
		t.Fatal("a refused snapshot left an image")
	}

	// Room for one of four concurrent snapshots' reservations (64 MiB
	// each): exactly one is made.
	setStorage(built + 100<<20)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.srv.SnapshotMicrovmImage(ctx, acct, id, "race"+string(rune('a'+i)))
		}()
	}
	wg.Wait()
	made := ""
	for i, err := range errs {
		switch {
		case err == nil:
			made += string(rune('a' + i))
		case !errors.As(err, &qe) || qe.Quota != store.QuotaStorageBytes:
			t.Errorf("snapshot %d: %v", i, err)
		}
	}
	if len(made) != 1 {
		t.Fatalf("%d of 4 concurrent snapshots were made (%s), want 1", len(made), made)
	}
	// What it holds is counted once known: over the quota now, so the
	// next is refused outright.
	if got, want := storage(), built+copiedMem+copiedDisk; got != want {
		t.Fatalf("storage in use after a snapshot %d, want %d", got, want)
	}
	if _, err := e.srv.SnapshotMicrovmImage(ctx, acct, id, "next"); !errors.As(err, &qe) {
		t.Fatalf("snapshot with the account over its storage quota: %v", err)
	}

	// A microVM of the snapshot runs with, and is charged, its memory.
	snapVM := e.runningVM(map[string]any{"imageIdentifier": "race" + made})
	m, err := e.st.GetMicrovm(ctx, acct, snapVM)
	if err != nil {
		t.Fatal(err)
	}
	if m.MemoryMiB != copiedMem>>20 {
		t.Fatalf("microVM of the snapshot charged %d MiB, want %d", m.MemoryMiB, copiedMem>>20)
	}
	e.ok("DELETE", base+"/microvms/"+snapVM, nil, nil)
	e.waitField(base+"/microvms/"+snapVM, "state", "TERMINATED")

	// Deleting the snapshot frees its storage.
	e.ok("DELETE", base+"/microvm-images/race"+made, nil, nil)
	if got := storage(); got != built {
		t.Fatalf("storage in use after deleting the snapshot %d, want %d", got, built)
	}
}

// TestMicrovmSizeFromResources: a microVM counts the vCPUs its image's
// size gets (VCPUsFor), not one each, and the largest resources entry's
// memory.
func TestMicrovmSizeFromResources(t *testing.T) {
	e := newEnv(t, func(c *api.Config) { c.Quota = api.DefaultQuota })
	body := imageBody("big")
	body["resources"] = []map[string]any{{"minimumMemoryInMiB": 2048}, {"minimumMemoryInMiB": 8192}}
	e.ok("POST", base+"/microvm-images", nil, body)
	e.waitField(base+"/microvm-images/big", "state", "CREATED")
	id := e.runningVM(map[string]any{"imageIdentifier": "big"})
	m, err := e.st.GetMicrovm(context.Background(), e.key.Account, id)
	if err != nil {
		t.Fatal(err)
	}
	if m.MemoryMiB != 8192 || m.VCPUs != 4 {
		t.Fatalf("microVM of an 8 GiB image: %d MiB, %d vCPUs; want 8192, 4", m.MemoryMiB, m.VCPUs)
	}
}
