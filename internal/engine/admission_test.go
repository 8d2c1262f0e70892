//go:build linux

package engine_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestHostAdmission runs real microVMs on an engine told the host has
// 3000 MiB and may commit 1.0 of it, with 2048 MiB guests: a second
// run, a resume and an auto-resume through the endpoint proxy are refused
// with the committed, requested and allowed MiB, and go through once the
// memory is freed. (Before, nothing bounded what the host committed.)
func TestHostAdmission(t *testing.T) {
	h := newHarness(t, func(c *engine.Config) { c.MemoryOvercommit, c.HostMemoryMiB = 1.0, 3000 })
	ctx := context.Background()
	wantMsg := func(t *testing.T, what, msg string) {
		t.Helper()
		for _, w := range []string{"2048 MiB committed", "2048 MiB requested", "3000 MiB allowed"} {
			if !strings.Contains(msg, w) {
				t.Errorf("%s: message lacks %q: %s", what, w, msg)
			}
		}
	}
	a := h.run([]string{allIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: true})
	if c, al := h.eng.CommittedMiB(); c != 2048 || al != 3000 {
		t.Fatalf("committed %d of %d MiB after one run, want 2048 of 3000", c, al)
	}

	// Run: refused before any VM or network is made.
	err := h.eng.AdmitMemory(ctx, 2048)
	if !errors.Is(err, errdefs.ErrExhausted) {
		t.Fatalf("AdmitMemory = %v, want ErrExhausted", err)
	}
	wantMsg(t, "run", err.Error())
	b := store.Microvm{ID: "mvm-admission-b", Account: "210987654321", State: store.StatePending, ImageName: testImage, ImageVersion: "1"}
	if err := h.eng.StartMicrovm(ctx, b); !errors.Is(err, errdefs.ErrExhausted) {
		t.Fatalf("StartMicrovm beyond the host = %v", err)
	}
	if _, tracked := h.eng.Guest(b.ID); tracked {
		t.Errorf("a refused start left engine state")
	}

	// Suspending frees the memory: another microVM runs.
	if err := h.srv.Suspend(ctx, testAccount, a.ID, "test"); err != nil {
		t.Fatal(err)
	}
	h.wait(a.ID, store.StateSuspended, 60*time.Second)
	if c, _ := h.eng.CommittedMiB(); c != 0 {
		t.Fatalf("committed %d MiB with the only VM suspended", c)
	}
	c := h.run([]string{allIngress}, nil)

	// Resume (the API's) and auto-resume (the proxy's) are refused.
	err = h.srv.Resume(ctx, testAccount, a.ID)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != 503 || ae.Type != "ServiceUnavailableException" {
		t.Fatalf("Resume on a full host = %v, want a 503 ServiceUnavailableException", err)
	}
	wantMsg(t, "resume", ae.Message)
	if m, _ := h.st.GetMicrovm(ctx, testAccount, a.ID); m.State != store.StateSuspended || m.PendingOp != "" {
		t.Errorf("after a refused resume: %s, pending %q", m.State, m.PendingOp)
	}
	code, body := h.get(a.ID, "/count", h.token(a.ID), nil)
	if code != 503 {
		t.Fatalf("auto-resume on a full host answered %d: %s", code, body)
	}
	wantMsg(t, "auto-resume", body)

	// Once c ends, the auto-resume goes through.
	if err := h.srv.Terminate(ctx, testAccount, c.ID, "test"); err != nil {
		t.Fatal(err)
	}
	h.wait(c.ID, store.StateTerminated, 60*time.Second)
	if code, body := h.get(a.ID, "/count", h.token(a.ID), nil); code != 200 {
		t.Fatalf("auto-resume with room answered %d: %s", code, body)
	}
	if c, _ := h.eng.CommittedMiB(); c != 2048 {
		t.Errorf("committed %d MiB after the resume, want 2048", c)
	}
}
