package storetest

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// events: every state change of a microVM and an image version is listed
// with its reason, in order, only to its own account, and a change that
// rolls back records nothing.
func events(t *testing.T, s store.Store) {
	now := time.Now().UTC()
	must(t, s.CreateMicrovm(ctx, newVM("A", "vm1", now), nil))
	steps := []struct {
		to     store.MicrovmState
		reason string
	}{
		{store.StateRunning, ""},
		{store.StateSuspending, "SuspendMicrovm"},
		{store.StateSuspended, "SuspendMicrovm"},
		{store.StateRunning, ""},
		{store.StateTerminating, "UserRequested: TerminateMicrovm"},
		{store.StateTerminated, "UserRequested: TerminateMicrovm"},
	}
	for i, st := range steps {
		_, err := s.UpdateMicrovm(ctx, "A", "vm1", nil, func(m *store.Microvm) error {
			m.SetState(st.to, st.reason, now.Add(time.Duration(i+1)*time.Second))
			return nil
		})
		must(t, err)
		// Not a state change: no event.
		_, err = s.UpdateMicrovm(ctx, "A", "vm1", nil, func(m *store.Microvm) error { m.PendingOp = ""; return nil })
		must(t, err)
	}
	// A change that fails records nothing.
	s.UpdateMicrovm(ctx, "A", "vm1", nil, func(m *store.Microvm) error {
		m.State = store.StateRunning
		return fmt.Errorf("no")
	})
	var got []store.Event
	tok := ""
	for {
		page, next, err := s.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventMicrovm, Resource: "vm1"}, store.Page{Limit: 3, Token: tok})
		must(t, err)
		got = append(got, page...)
		if tok = next; tok == "" {
			break
		}
	}
	want := []string{"->PENDING RunMicrovm", "PENDING->RUNNING Started", "RUNNING->SUSPENDING SuspendMicrovm",
		"SUSPENDING->SUSPENDED SuspendMicrovm", "SUSPENDED->RUNNING Resumed", "RUNNING->TERMINATING UserRequested: TerminateMicrovm",
		"TERMINATING->TERMINATED UserRequested: TerminateMicrovm"}
	if len(got) != len(want) {
		t.Fatalf("events = %+v, want %d", got, len(want))
	}
	for i, ev := range got {
		if s := ev.From + "->" + ev.State + " " + ev.Reason; s != want[i] {
			t.Errorf("event %d = %q, want %q", i, s, want[i])
		}
		if i > 0 && (ev.At.Before(got[i-1].At) || ev.Seq <= got[i-1].Seq) {
			t.Errorf("event %d out of order", i)
		}
	}
	if other, _, _ := s.ListEvents(ctx, "B", store.EventFilter{Kind: store.EventMicrovm, Resource: "vm1"}, store.Page{}); len(other) != 0 {
		t.Errorf("account B sees A's events: %+v", other)
	}

	img, v, b := newImage("A", "app")
	must(t, s.CreateImage(ctx, img, v, b, nil))
	v.State, v.UpdatedAt = store.VersionInProgress, now
	must(t, s.UpdateImageVersion(ctx, v))
	must(t, s.UpdateImageVersion(ctx, v)) // unchanged: no event
	v.State, v.StateReason = store.VersionFailed, "BuildFailed: step 2"
	must(t, s.UpdateImageVersion(ctx, v))
	must(t, s.DeleteImageVersion(ctx, "A", "app", "1"))
	ev, _, err := s.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventImageVersion, Resource: "app", Version: "1"}, store.Page{})
	must(t, err)
	var states []string
	for _, e := range ev {
		states = append(states, e.State+":"+e.Reason)
	}
	if fmt.Sprint(states) != "[PENDING:Created IN_PROGRESS: FAILED:BuildFailed: step 2 DELETED:DeleteMicrovmImageVersion]" {
		t.Errorf("image version events = %v", states)
	}
}

// usage: intervals are summed per account, clipped to the window, extended
// by later puts, and closed where they were last extended.
func usage(t *testing.T, s store.Store) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	must(t, s.PutUsage(ctx, []store.UsageInterval{
		{Key: "r1", Account: "A", Resource: "vm1", Kind: store.UsageRunning, VCPUs: 2, MemoryMiB: 1024, Start: t0, End: t0.Add(10 * time.Second), Open: true},
		{Key: "s1", Account: "A", Resource: "vm2", Kind: store.UsageSuspended, VCPUs: 1, MemoryMiB: 512, Start: t0, End: t0.Add(100 * time.Second)},
		{Key: "b1", Account: "A", Resource: "build1", Kind: store.UsageBuild, Start: t0, End: t0.Add(30 * time.Second)},
		{Key: "r2", Account: "B", Resource: "vm3", Kind: store.UsageRunning, VCPUs: 1, MemoryMiB: 2048, Start: t0, End: t0.Add(5 * time.Second)},
	}))
	// A checkpoint extends r1 to 60 s; an older one does not shrink it.
	must(t, s.PutUsage(ctx, []store.UsageInterval{{Key: "r1", Account: "A", Resource: "vm1", Kind: store.UsageRunning, VCPUs: 2, MemoryMiB: 1024, Start: t0, End: t0.Add(60 * time.Second), Open: true}}))
	must(t, s.PutUsage(ctx, []store.UsageInterval{{Key: "r1", Account: "A", Resource: "vm1", Kind: store.UsageRunning, VCPUs: 2, MemoryMiB: 1024, Start: t0, End: t0.Add(20 * time.Second), Open: true}}))
	// Another host's open interval is not closed by this one's restart.
	must(t, s.PutUsage(ctx, []store.UsageInterval{{Key: "n1", Account: "B", Resource: "vm4", Kind: store.UsageRunning, VCPUs: 1, MemoryMiB: 1024,
		Start: t0, End: t0, Open: true, Node: "host-2"}})) // no length: the totals below stay
	n, err := s.CloseOpenUsage(ctx, "")
	must(t, err)
	if n != 1 {
		t.Errorf("CloseOpenUsage closed %d, want 1", n)
	}
	if n, err := s.CloseOpenUsage(ctx, "host-2"); err != nil || n != 1 {
		t.Errorf("CloseOpenUsage of host-2 closed %d (%v), want 1", n, err)
	}
	us, err := s.UsageTotals(ctx, "A", t0, t0.Add(time.Hour))
	must(t, err)
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-6 }
	if len(us) != 1 || !near(us[0].RunningVCPUSeconds, 120) || !near(us[0].RunningGiBSeconds, 60) ||
		!near(us[0].SuspendedGiBSeconds, 50) || us[0].Builds != 1 || !near(us[0].BuildSeconds, 30) {
		t.Errorf("usage of A = %+v", us)
	}
	// Clipped to [50 s, 1 h): 10 s running, 50 s suspended, no build.
	us, err = s.UsageTotals(ctx, "A", t0.Add(50*time.Second), t0.Add(time.Hour))
	must(t, err)
	if len(us) != 1 || !near(us[0].RunningVCPUSeconds, 20) || !near(us[0].SuspendedGiBSeconds, 25) || us[0].Builds != 0 {
		t.Errorf("usage of A since 50 s = %+v", us)
	}
	all, err := s.UsageTotals(ctx, "", t0, t0.Add(time.Hour))
	must(t, err)
	if len(all) != 2 || all[1].Account != "B" || !near(all[1].RunningGiBSeconds, 10) {
		t.Errorf("usage of all = %+v", all)
	}
	none, err := s.UsageTotals(ctx, "C", t0, t0.Add(time.Hour))
	must(t, err)
	if len(none) != 1 || none[0].Account != "C" || none[0].RunningVCPUSeconds != 0 {
		t.Errorf("usage of an idle account = %+v", none)
	}
}
