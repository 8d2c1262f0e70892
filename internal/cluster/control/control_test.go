package control

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// noNodes fails every node call: these tests cover what control decides
// without a node (the calls themselves are test/cluster's).
type noNodes struct{}

func (noNodes) Get(n store.Node) (*noderpc.Client, error) {
	return nil, errors.New("no node calls in this test")
}

func newBackend(t *testing.T) (*Backend, *sqlite.Store) {
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return New(st, noNodes{}, nil), st
}

func microvm(t *testing.T, st *sqlite.Store, id, node string, state store.MicrovmState) store.Microvm {
	now := time.Now().UTC()
	m := store.Microvm{ID: id, Account: "111122223333", State: state, ImageName: "app", ImageVersion: "1", Node: node,
		MemoryMiB: 512, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(time.Hour)}
	if err := st.CreateMicrovm(context.Background(), m, nil); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestAdmitMemory(t *testing.T) {
	b, st := newBackend(t)
	ctx := context.Background()
	if err := b.AdmitMemory(ctx, 512); !errors.Is(err, errdefs.ErrExhausted) {
		t.Fatalf("no nodes: %v", err)
	}
	lease := time.Now().Add(time.Minute)
	for _, n := range []store.Node{{Name: "a", RPCAddr: "a:1", CapacityMiB: 1024, LeaseExpiresAt: lease},
		{Name: "b", RPCAddr: "b:1", CapacityMiB: 4096, LeaseExpiresAt: time.Now().Add(-time.Minute)}} {
		if _, err := st.RegisterNode(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.AdmitMemory(ctx, 1024); err != nil {
		t.Fatalf("room on a: %v", err)
	}
	// b has room but its lease ran out; a has 1024.
	if err := b.AdmitMemory(ctx, 2048); !errors.Is(err, errdefs.ErrExhausted) || !strings.Contains(err.Error(), "1024 MiB") {
		t.Fatalf("2048 MiB: %v", err)
	}
	if err := st.SetNodeCordoned(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if err := b.AdmitMemory(ctx, 512); !errors.Is(err, errdefs.ErrExhausted) {
		t.Fatalf("only a cordoned node: %v", err)
	}
}

// TestWorkNoNodeOwns: a microVM never placed, or placed on a node that
// is lost, is ended by control itself; Recover leaves a live node's work
// to it.
func TestWorkNoNodeOwns(t *testing.T) {
	b, st := newBackend(t)
	ctx := context.Background()
	if _, err := st.RegisterNode(ctx, store.Node{Name: "live", RPCAddr: "x:1", CapacityMiB: 4096, LeaseExpiresAt: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.RegisterNode(ctx, store.Node{Name: "gone", RPCAddr: "y:1", CapacityMiB: 4096, LeaseExpiresAt: time.Now().Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.ExpireNodes(ctx, time.Now(), time.Second); err != nil {
		t.Fatal(err)
	}
	unplaced := microvm(t, st, "mvm-unplaced", "", store.StateTerminating)
	if err := b.TerminateMicrovm(ctx, unplaced); err != nil {
		t.Fatal(err)
	}
	onLost := microvm(t, st, "mvm-lost", "gone", store.StateRunning)
	onLive := microvm(t, st, "mvm-live", "live", store.StateRunning)
	if err := b.Recover(ctx, []store.Microvm{onLost, onLive}, nil); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]store.MicrovmState{"mvm-unplaced": store.StateTerminated, "mvm-lost": store.StateTerminated, "mvm-live": store.StateRunning} {
		m, err := st.LocateMicrovm(ctx, id)
		if err != nil || m.State != want {
			t.Errorf("%s: %s (%v), want %s", id, m.State, err, want)
		}
		if id == "mvm-lost" && !strings.HasPrefix(m.StateReason, store.ReasonHostLost) {
			t.Errorf("%s ended with %q, want HostLost", id, m.StateReason)
		}
	}
	// Suspending a microVM whose node is lost is refused, saying why.
	if err := b.SuspendMicrovm(ctx, onLost); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "gone") {
		t.Errorf("suspend on a lost node: %v", err)
	}
}
