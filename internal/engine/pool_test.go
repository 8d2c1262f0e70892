//go:build linux

package engine_test

import (
	"context"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestPooledRun: with a clone pool, a RunMicrovm after the first takes a
// process started ahead, reserved before the microVM's network is made so
// that the network is made in that process's own namespace around its
// TAP; the microVM then serves through its endpoint and terminates like
// any other.
func TestPooledRun(t *testing.T) {
	h := newHarness(t)
	drv := fx.Driver
	drv.SetPoolSize(1)
	t.Cleanup(func() { drv.SetPoolSize(0) })
	first := h.run([]string{allIngress}, nil)
	deadline := time.Now().Add(3 * time.Minute)
	for drv.PoolSize(fx.Template) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the clone pool did not fill")
		}
		time.Sleep(50 * time.Millisecond)
	}
	pooled := drv.PooledPIDs()
	if len(pooled) != 1 {
		t.Fatalf("pooled pids %v, want one", pooled)
	}
	second := h.run([]string{allIngress}, nil)
	ph, _ := drv.StartPhases(second.ID)
	info, err := drv.Inspect(context.Background(), second.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !ph.Pooled || info.PID != pooled[0] {
		t.Fatalf("second microvm: pooled %v pid %d, want the pooled process %d", ph.Pooled, info.PID, pooled[0])
	}
	for _, m := range []store.Microvm{first, second} {
		if code, body := h.get(m.ID, "/count", h.token(m.ID), nil); code != 200 || body != "count=1" {
			t.Errorf("%s answered %d %q, want 200 count=1", m.ID, code, body)
		}
	}
	for _, m := range []store.Microvm{first, second} {
		h.srv.Terminate(context.Background(), testAccount, m.ID, "UserRequested: test")
		h.wait(m.ID, store.StateTerminated, 30*time.Second)
	}
}
