package storetest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// The cluster section (store.Cluster): stores that are not a Cluster skip
// it.

func cluster(t *testing.T, s store.Store) store.Cluster {
	t.Helper()
	c, ok := s.(store.Cluster)
	if !ok {
		t.Skipf("%T is not a store.Cluster", s)
	}
	return c
}

// newNode is an ACTIVE node of platform "p1" leased for a minute.
func newNode(name string, capacityMiB int64, now time.Time) store.Node {
	return store.Node{Name: name, RPCAddr: name + ":7001", TunnelAddr: name + ":7002", Platform: "p1",
		CapacityMiB: capacityMiB, LeaseExpiresAt: now.Add(time.Minute)}
}

func register(t *testing.T, c store.Cluster, n store.Node) store.Node {
	t.Helper()
	got, err := c.RegisterNode(ctx, n)
	must(t, err)
	return got
}

// sizedVM creates a microVM of memMiB in account.
func sizedVM(t *testing.T, s store.Store, account, id string, memMiB int64, now time.Time) {
	t.Helper()
	m := newVM(account, id, now)
	m.MemoryMiB = memMiB
	must(t, s.CreateMicrovm(ctx, m, nil))
}

func place(c store.Cluster, account, id string, memMiB int64, now time.Time) (store.Microvm, store.Node, error) {
	return c.PlaceMicrovm(ctx, account, id, store.Placement{MemoryMiB: memMiB, Platform: "p1", Now: now})
}

func terminate(t *testing.T, s store.Store, account, id string, now time.Time) {
	t.Helper()
	_, err := s.UpdateMicrovm(ctx, account, id, nil, func(m *store.Microvm) error {
		m.SetState(store.StateTerminated, "UserRequested: TerminateMicrovm", now)
		return nil
	})
	must(t, err)
}

// nodes: registration, renewal, LOST and registration again, cordons.
func nodes(t *testing.T, s store.Store) {
	c := cluster(t, s)
	now := time.Now().UTC()
	n1 := register(t, c, newNode("n1", 4096, now))
	if n1.State != store.NodeActive || n1.Cordoned || n1.CommittedMiB != 0 || !n1.LeaseExpiresAt.Equal(now.Add(time.Minute)) || n1.RegisteredAt.IsZero() {
		t.Fatalf("RegisterNode = %+v", n1)
	}
	_, err := c.RegisterNode(ctx, store.Node{CapacityMiB: 1})
	is(t, err, errdefs.ErrInvalid)
	_, err = c.RegisterNode(ctx, store.Node{Name: "n9", CapacityMiB: -1})
	is(t, err, errdefs.ErrInvalid)

	must(t, c.RenewNodeLease(ctx, "n1", now.Add(2*time.Minute)))
	got, err := c.GetNode(ctx, "n1")
	must(t, err)
	if !got.LeaseExpiresAt.Equal(now.Add(2*time.Minute)) || got.RPCAddr != "n1:7001" || got.Platform != "p1" || got.CapacityMiB != 4096 {
		t.Errorf("after renewal: %+v", got)
	}
	is(t, c.RenewNodeLease(ctx, "nope", now), errdefs.ErrNotFound)
	_, err = c.GetNode(ctx, "nope")
	is(t, err, errdefs.ErrNotFound)

	// A cordon outlives registration again.
	must(t, c.SetNodeCordoned(ctx, "n1", true))
	is(t, c.SetNodeCordoned(ctx, "nope", true), errdefs.ErrNotFound)
	again := newNode("n1", 8192, now)
	again.RPCAddr = "moved:7001"
	if got := register(t, c, again); !got.Cordoned || got.CapacityMiB != 8192 || got.RPCAddr != "moved:7001" {
		t.Errorf("registered again: %+v, want cordoned with the new capacity and address", got)
	}
	must(t, c.SetNodeCordoned(ctx, "n1", false))
	if got, err := c.GetNode(ctx, "n1"); err != nil || got.Cordoned {
		t.Errorf("uncordoned: %+v, %v", got, err)
	}

	// A lease that expired past the grace: LOST, refused renewal, back
	// by registering.
	late := newNode("n2", 4096, now)
	late.LeaseExpiresAt = now.Add(-time.Minute)
	register(t, c, late)
	// What n2 metered is open until it is declared lost.
	must(t, s.PutUsage(ctx, []store.UsageInterval{{Key: "on-n2", Account: "A", Resource: "vm-n2", Kind: store.UsageRunning,
		VCPUs: 1, MemoryMiB: 512, Start: now.Add(-time.Hour), End: now.Add(-time.Minute), Open: true, Node: "n2"}}))
	lost, err := c.ExpireNodes(ctx, now, 2*time.Minute)
	must(t, err)
	if len(lost) != 0 {
		t.Errorf("ExpireNodes within the grace = %v", lost)
	}
	lost, err = c.ExpireNodes(ctx, now, 30*time.Second)
	must(t, err)
	if !slices.Equal(lost, []string{"n2"}) {
		t.Fatalf("ExpireNodes = %v, want [n2]", lost)
	}
	if got, err := c.GetNode(ctx, "n2"); err != nil || got.State != store.NodeLost {
		t.Fatalf("expired node: %+v, %v", got, err)
	}
	if n, err := s.CloseOpenUsage(ctx, "n2"); err != nil || n != 0 {
		t.Errorf("the lost node's usage interval was left open: closing it now closed %d (%v)", n, err)
	}
	is(t, c.RenewNodeLease(ctx, "n2", now.Add(time.Minute)), errdefs.ErrConflict)
	if lost, err := c.ExpireNodes(ctx, now, 0); err != nil || len(lost) != 0 {
		t.Errorf("a LOST node expired again: %v, %v", lost, err)
	}
	if got := register(t, c, newNode("n2", 4096, now)); got.State != store.NodeActive {
		t.Errorf("registered after LOST: %+v", got)
	}
	must(t, c.RenewNodeLease(ctx, "n2", now.Add(time.Minute)))

	register(t, c, newNode("n0", 1, now))
	ns, err := c.ListNodes(ctx)
	must(t, err)
	var names []string
	for _, n := range ns {
		names = append(names, n.Name)
	}
	if !slices.Equal(names, []string{"n0", "n1", "n2"}) {
		t.Errorf("ListNodes = %v", names)
	}
	is(t, c.SetNodeTemplates(ctx, "nope", []string{"A/app/1"}), errdefs.ErrNotFound)
}

// placement: which node a microVM is given, and when none.
func placement(t *testing.T, s store.Store) {
	c := cluster(t, s)
	now := time.Now().UTC()
	for i := 0; i < 8; i++ {
		sizedVM(t, s, "A", fmt.Sprintf("vm%d", i), 1024, now)
	}
	_, _, err := place(c, "A", "vm0", 1024, now)
	is(t, err, errdefs.ErrExhausted) // no node at all
	register(t, c, newNode("big", 4096, now))
	register(t, c, newNode("small", 2048, now))
	other := newNode("other", 1<<20, now)
	other.Platform = "p2"
	register(t, c, other)

	// The most free memory first; the record says where and moves on an epoch.
	m, n, err := place(c, "A", "vm0", 1024, now)
	must(t, err)
	if m.Node != "big" || m.Epoch != 1 || n.Name != "big" || n.CommittedMiB != 1024 {
		t.Fatalf("placed on %q (epoch %d), node %+v", m.Node, m.Epoch, n)
	}
	if got, _ := s.GetMicrovm(ctx, "A", "vm0"); got.Node != "big" || got.Epoch != 1 {
		t.Errorf("stored: node %q epoch %d", got.Node, got.Epoch)
	}
	// More free memory, then (equal) the name.
	for _, id := range []string{"vm1", "vm2"} {
		if m, _, err := place(c, "A", id, 1024, now); err != nil || m.Node != "big" {
			t.Fatalf("%s placed on %q, %v; want big", id, m.Node, err)
		}
	}
	// The template's holder comes before the most free memory.
	must(t, c.SetNodeTemplates(ctx, "big", []string{"A/app/1", "A/app/1", "B/x/1"}))
	tmpl := store.Placement{MemoryMiB: 1024, Platform: "p1", Template: "A/app/1", Now: now}
	m, n, err = c.PlaceMicrovm(ctx, "A", "vm3", tmpl)
	must(t, err)
	if m.Node != "big" || n.CommittedMiB != 4096 {
		t.Fatalf("placed on %q (%d MiB committed), want the template's holder big", m.Node, n.CommittedMiB)
	}
	// Placed again, a microVM does not count against itself: it still
	// fits on big, full with it.
	if m, n, err := c.PlaceMicrovm(ctx, "A", "vm3", tmpl); err != nil || m.Node != "big" || n.CommittedMiB != 4096 || m.Epoch != 2 {
		t.Fatalf("placed again on the same node: %+v, %+v, %v", m, n, err)
	}
	must(t, c.SetNodeTemplates(ctx, "big", nil))
	// A placement asking for more memory than recorded records it.
	if m, n, err := place(c, "A", "vm3", 2048, now); err != nil || m.Node != "small" || n.CommittedMiB != 2048 || m.MemoryMiB != 2048 || m.Epoch != 3 {
		t.Fatalf("placed again, bigger: %+v, %+v, %v", m, n, err)
	}
	// big 3072/4096, small 2048/2048: 1024 fits on big only, then nothing.
	if m, _, err := place(c, "A", "vm4", 1024, now); err != nil || m.Node != "big" {
		t.Fatalf("last fit: %q, %v", m.Node, err)
	}
	_, _, err = place(c, "A", "vm5", 1024, now)
	is(t, err, errdefs.ErrExhausted)
	if !strings.Contains(err.Error(), "of another platform") || !strings.Contains(err.Error(), "without 1024 MiB free") {
		t.Errorf("refusal does not say why: %v", err)
	}
	// Another platform's node has room, and takes microVMs of its platform.
	if m, _, err := c.PlaceMicrovm(ctx, "A", "vm5", store.Placement{MemoryMiB: 1024, Platform: "p2", Now: now}); err != nil || m.Node != "other" {
		t.Fatalf("p2 placement: %q, %v", m.Node, err)
	}
	// A terminated microVM frees its memory; a terminated one is not placed.
	terminate(t, s, "A", "vm0", now)
	_, _, err = place(c, "A", "vm0", 1024, now)
	is(t, err, errdefs.ErrConflict)
	if got, err := c.GetNode(ctx, "big"); err != nil || got.CommittedMiB != 3072 {
		t.Fatalf("big after a termination: %+v, %v", got, err)
	}
	// Cordoned and expired nodes are given nothing.
	must(t, c.SetNodeCordoned(ctx, "big", true))
	_, _, err = place(c, "A", "vm6", 1024, now)
	is(t, err, errdefs.ErrExhausted)
	must(t, c.SetNodeCordoned(ctx, "big", false))
	must(t, c.RenewNodeLease(ctx, "big", now.Add(-time.Second)))
	_, _, err = place(c, "A", "vm6", 1024, now)
	is(t, err, errdefs.ErrExhausted)
	must(t, c.RenewNodeLease(ctx, "big", now.Add(time.Minute)))
	if m, _, err := place(c, "A", "vm6", 1024, now); err != nil || m.Node != "big" {
		t.Fatalf("after renewal: %q, %v", m.Node, err)
	}
	_, _, err = place(c, "A", "nope", 1024, now)
	is(t, err, errdefs.ErrNotFound)

	// A record written with its node, and one whose node a change moves,
	// are listed by it (the node column follows the record).
	direct := newVM("A", "direct", now)
	direct.Node = "other"
	must(t, s.CreateMicrovm(ctx, direct, nil))
	if vms, err := c.ListNodeMicrovms(ctx, "other"); err != nil || len(vms) != 2 {
		t.Fatalf("ListNodeMicrovms(other) = %+v, %v; want vm5 and direct", vms, err)
	}
	_, err = s.UpdateMicrovm(ctx, "A", "direct", nil, func(m *store.Microvm) error { m.Node = "small"; return nil })
	must(t, err)
	// What each node reconciles against: its live microVMs.
	want := map[string][]string{"big": {"vm1", "vm2", "vm4", "vm6"}, "small": {"vm3", "direct"}, "other": {"vm5"}, "nope": nil}
	for node, ids := range want {
		vms, err := c.ListNodeMicrovms(ctx, node)
		must(t, err)
		var got []string
		for _, m := range vms {
			got = append(got, m.ID)
		}
		if !slices.Equal(got, ids) {
			t.Errorf("ListNodeMicrovms(%s) = %v, want %v", node, got, ids)
		}
	}
	// An edge finds a microVM by id whatever its account.
	sizedVM(t, s, "B", "vmB", 512, now)
	for id, account := range map[string]string{"vm1": "A", "vmB": "B"} {
		if m, err := c.LocateMicrovm(ctx, id); err != nil || m.Account != account {
			t.Errorf("LocateMicrovm(%s) = %+v, %v", id, m, err)
		}
	}
	_, err = c.LocateMicrovm(ctx, "nope")
	is(t, err, errdefs.ErrNotFound)
}

// hostLost: ExpireNodes terminates the live microVMs of the lost node
// alone, through the path every state change takes (events, epochs).
func hostLost(t *testing.T, s store.Store) {
	c := cluster(t, s)
	now := time.Now().UTC()
	register(t, c, newNode("doomed", 8192, now))
	register(t, c, newNode("fine", 8192, now))
	for i := 0; i < 6; i++ {
		sizedVM(t, s, "A", fmt.Sprintf("vm%d", i), 1024, now)
	}
	sizedVM(t, s, "A", "unplaced", 1024, now)
	must(t, c.SetNodeCordoned(ctx, "fine", true))
	for i := 0; i < 4; i++ {
		m, _, err := place(c, "A", fmt.Sprintf("vm%d", i), 1024, now)
		must(t, err)
		if m.Node != "doomed" {
			t.Fatalf("vm%d placed on %s", i, m.Node)
		}
	}
	must(t, c.SetNodeCordoned(ctx, "fine", false))
	must(t, c.SetNodeCordoned(ctx, "doomed", true))
	for i := 4; i < 6; i++ {
		_, _, err := place(c, "A", fmt.Sprintf("vm%d", i), 1024, now)
		must(t, err)
	}
	_, err := s.UpdateMicrovm(ctx, "A", "vm1", nil, func(m *store.Microvm) error {
		m.SetState(store.StateRunning, "", now)
		return nil
	})
	must(t, err)
	terminate(t, s, "A", "vm3", now)

	expiry := now.Add(-time.Minute)
	must(t, c.RenewNodeLease(ctx, "doomed", expiry))
	at := now.Add(time.Second)
	lost, err := c.ExpireNodes(ctx, at, 10*time.Second)
	must(t, err)
	if !slices.Equal(lost, []string{"doomed"}) {
		t.Fatalf("ExpireNodes = %v", lost)
	}
	reason := fmt.Sprintf("HostLost: node doomed stopped renewing its lease at %s", expiry.Format(time.RFC3339))
	for i := 0; i < 6; i++ {
		id := fmt.Sprintf("vm%d", i)
		m, err := s.GetMicrovm(ctx, "A", id)
		must(t, err)
		evs, _, err := s.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventMicrovm, Resource: id}, store.Page{})
		must(t, err)
		last := evs[len(evs)-1]
		switch {
		case i < 3: // live on the lost node
			if m.State != store.StateTerminated || m.StateReason != reason || m.TerminatedAt == nil || !m.TerminatedAt.Equal(at) || m.Epoch != 2 {
				t.Errorf("%s: %s %q terminated %v epoch %d", id, m.State, m.StateReason, m.TerminatedAt, m.Epoch)
			}
			if last.State != string(store.StateTerminated) || last.Reason != reason || !last.At.Equal(at) || last.From == "" {
				t.Errorf("%s: last event %+v", id, last)
			}
			if !strings.HasPrefix(m.StateReason, store.ReasonHostLost) {
				t.Errorf("%s: reason %q", id, m.StateReason)
			}
		case i == 3: // terminated before: untouched
			if m.StateReason == reason || m.Epoch != 1 || len(evs) != 2 {
				t.Errorf("%s: terminated again: %+v, events %+v", id, m, evs)
			}
		default: // on the other node
			if m.State != store.StatePending || m.Node != "fine" || len(evs) != 1 {
				t.Errorf("%s: %+v, events %+v", id, m, evs)
			}
		}
	}
	if m, err := s.GetMicrovm(ctx, "A", "unplaced"); err != nil || m.State != store.StatePending {
		t.Errorf("an unplaced microVM: %+v, %v", m, err)
	}
	// A late report of the lost node, made under its epoch, is refused.
	_, err = s.UpdateMicrovm(ctx, "A", "vm1", nil, store.AtEpoch(1, func(m *store.Microvm) error {
		m.SetState(store.StateRunning, "", now)
		return nil
	}))
	is(t, err, store.ErrStaleEpoch)
	vms, err := c.ListNodeMicrovms(ctx, "doomed")
	must(t, err)
	if len(vms) != 0 {
		t.Errorf("the lost node still has %d microVMs", len(vms))
	}
	if n, err := c.GetNode(ctx, "doomed"); err != nil || n.CommittedMiB != 0 || n.State != store.NodeLost {
		t.Errorf("lost node: %+v, %v", n, err)
	}
	if n, err := c.GetNode(ctx, "fine"); err != nil || n.CommittedMiB != 2048 || n.State != store.NodeActive {
		t.Errorf("other node: %+v, %v", n, err)
	}
}

// leases: one holder at a time, until it expires or is given up.
func leases(t *testing.T, s store.Store) {
	c := cluster(t, s)
	now := time.Now().UTC()
	take := func(holder string, until, at time.Time, want bool) {
		t.Helper()
		got, err := c.AcquireLease(ctx, "gc", holder, until, at)
		must(t, err)
		if got != want {
			t.Fatalf("AcquireLease(%s, until %v, at %v) = %v, want %v", holder, until.Sub(now), at.Sub(now), got, want)
		}
	}
	take("a", now.Add(10*time.Second), now, true)
	take("b", now.Add(10*time.Second), now, false)
	take("a", now.Add(20*time.Second), now.Add(5*time.Second), true) // renewed
	take("b", now.Add(30*time.Second), now.Add(15*time.Second), false)
	take("b", now.Add(30*time.Second), now.Add(20*time.Second), true) // expired at 20 s
	take("a", now.Add(40*time.Second), now.Add(21*time.Second), false)
	must(t, c.ReleaseLease(ctx, "gc", "a")) // not a's: nothing
	take("a", now.Add(40*time.Second), now.Add(22*time.Second), false)
	must(t, c.ReleaseLease(ctx, "gc", "b"))
	take("a", now.Add(40*time.Second), now.Add(22*time.Second), true)
	// Other names are other leases.
	if ok, err := c.AcquireLease(ctx, "other", "b", now.Add(time.Minute), now); err != nil || !ok {
		t.Errorf("another lease: %v, %v", ok, err)
	}
	_, err := c.AcquireLease(ctx, "gc", "", now, now)
	is(t, err, errdefs.ErrInvalid)
}

// placeRace: 20 placements at once through two handles, on two nodes with
// room for exactly 7 of them, place 7 and over-commit neither node.
func placeRace(t *testing.T, a, b store.Store) {
	ca, cb := cluster(t, a), cluster(t, b)
	now := time.Now().UTC()
	register(t, ca, newNode("n1", 4*512, now))
	register(t, cb, newNode("n2", 3*512+511, now))
	for i := 0; i < 20; i++ {
		sizedVM(t, a, "A", fmt.Sprintf("vm%d", i), 512, now)
	}
	handles := []store.Cluster{ca, cb}
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = place(handles[i%2], "A", fmt.Sprintf("vm%d", i), 512, now)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, errdefs.ErrExhausted):
			t.Errorf("placement: %v", err)
		}
	}
	ns, err := cb.ListNodes(ctx)
	must(t, err)
	placed := 0
	for _, n := range ns {
		vms, err := ca.ListNodeMicrovms(ctx, n.Name)
		must(t, err)
		placed += len(vms)
		if n.CommittedMiB > n.CapacityMiB || n.CommittedMiB != int64(len(vms))*512 {
			t.Errorf("node %s: %d MiB committed of %d, %d microVMs", n.Name, n.CommittedMiB, n.CapacityMiB, len(vms))
		}
	}
	if ok != 7 || placed != 7 {
		t.Errorf("%d placements succeeded, %d microVMs placed; want 7", ok, placed)
	}
}

// expireRace: handles racing ExpireNodes declare the node lost once and
// terminate each of its microVMs once.
func expireRace(t *testing.T, a, b store.Store) {
	ca, cb := cluster(t, a), cluster(t, b)
	now := time.Now().UTC()
	register(t, ca, newNode("n1", 1<<20, now))
	const vms = 10
	for i := 0; i < vms; i++ {
		sizedVM(t, a, "A", fmt.Sprintf("vm%d", i), 512, now)
		_, _, err := place(ca, "A", fmt.Sprintf("vm%d", i), 512, now)
		must(t, err)
	}
	must(t, ca.RenewNodeLease(ctx, "n1", now.Add(-time.Minute)))
	handles := []store.Cluster{ca, cb}
	var wg sync.WaitGroup
	lost := make([][]string, 8)
	errs := make([]error, len(lost))
	for i := range lost {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lost[i], errs[i] = handles[i%2].ExpireNodes(ctx, now, 0)
		}()
	}
	wg.Wait()
	declared := 0
	for i := range lost {
		must(t, errs[i])
		declared += len(lost[i])
	}
	if declared != 1 {
		t.Errorf("the node was declared lost %d times: %v", declared, lost)
	}
	for i := 0; i < vms; i++ {
		id := fmt.Sprintf("vm%d", i)
		evs, _, err := b.ListEvents(ctx, "A", store.EventFilter{Kind: store.EventMicrovm, Resource: id}, store.Page{})
		must(t, err)
		n := 0
		for _, ev := range evs {
			if ev.State == string(store.StateTerminated) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s terminated %d times: %+v", id, n, evs)
		}
	}
}

// leaseRace: holders taking one lease at once through two handles: one
// wins each round.
func leaseRace(t *testing.T, a, b store.Store) {
	handles := []store.Cluster{cluster(t, a), cluster(t, b)}
	now := time.Now().UTC()
	for round := 0; round < 10; round++ {
		name := fmt.Sprintf("lease%d", round)
		if round%2 == 1 { // an expired holder's lease is taken as a free one
			ok, err := handles[0].AcquireLease(ctx, name, "old", now.Add(-time.Second), now.Add(-time.Minute))
			must(t, err)
			if !ok {
				t.Fatal("the first holder did not get a free lease")
			}
		}
		var wg sync.WaitGroup
		won := make([]bool, 6)
		errs := make([]error, len(won))
		for i := range won {
			wg.Add(1)
			go func() {
				defer wg.Done()
				won[i], errs[i] = handles[i%2].AcquireLease(ctx, name, fmt.Sprintf("h%d", i), now.Add(time.Minute), now)
			}()
		}
		wg.Wait()
		n := 0
		for i := range won {
			must(t, errs[i])
			if won[i] {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("round %d: %d holders took the lease: %v", round, n, won)
		}
	}
}
