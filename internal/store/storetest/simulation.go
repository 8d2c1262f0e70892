package storetest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Simulate places 1,000 microVMs of mixed sizes and platforms over 20
// nodes of mixed capacities through s's PlaceMicrovm, the real store's
// transactions, and checks what placement promises:
//
//   - phase 1 (750 microVMs, nothing ends, there is room): every one is
//     placed, and the free memory of the nodes of one platform stays
//     within the largest microVM of each other (placement takes the node
//     with the most free memory), so nodes of one capacity carry loads
//     within a ratio of 1.25 of each other;
//   - phase 2 (the other 250, with microVMs ending, a node cordoned and a
//     node lost on the way, until memory runs out): a refusal happens
//     only when no node that may take the microVM has room, nothing is
//     placed on the cordoned or the lost node, and the lost node's
//     microVMs end HostLost;
//   - always: no node is over-committed, and every microVM runs on a node
//     of its platform.
//
// The run is deterministic (a fixed seed), and logs its figures.
func Simulate(t *testing.T, s store.Store) {
	c := cluster(t, s)
	start := time.Now()
	now := start.UTC()
	rng := rand.New(rand.NewPCG(12, 2026))

	// 14 x86 nodes and 6 arm nodes of 3 sizes: 896 GiB in all.
	type class struct {
		platform string
		gib      int64
		count    int
	}
	classes := []class{{"x86", 32, 6}, {"x86", 48, 6}, {"x86", 96, 2}, {"arm", 32, 4}, {"arm", 48, 2}}
	for _, cl := range classes {
		for i := 0; i < cl.count; i++ {
			n := newNode(fmt.Sprintf("%s-%d-%d", cl.platform, cl.gib, i), cl.gib<<10, now)
			n.Platform = cl.platform
			n.LeaseExpiresAt = now.Add(time.Hour)
			register(t, c, n)
		}
	}
	// Sizes from 256 MiB to 4 GiB, small ones most (0.9 GiB on average);
	// a quarter are arm.
	sizes := []int64{256, 512, 1024, 2048, 4096}
	weights := []int{30, 30, 20, 15, 5}
	pick := func() int64 {
		r := rng.IntN(100)
		for i, w := range weights {
			if r < w {
				return sizes[i]
			}
			r -= w
		}
		return sizes[0]
	}
	const total, phase1 = 1000, 750
	type vm struct {
		id, platform string
		mib          int64
	}
	vms := make([]vm, total)
	platformOf := map[string]string{} // of each microVM
	for i := range vms {
		vms[i] = vm{id: fmt.Sprintf("vm%04d", i), platform: "x86", mib: pick()}
		if rng.IntN(4) == 0 {
			vms[i].platform = "arm"
		}
		platformOf[vms[i].id] = vms[i].platform
		m := newVM(fmt.Sprintf("acct%d", i%7), vms[i].id, now)
		m.MemoryMiB = vms[i].mib
		must(t, s.CreateMicrovm(ctx, m, nil))
	}

	var placed []vm // live and placed, in order
	placedOn := map[string]string{}
	refused, ended := 0, 0
	var placeTime time.Duration
	// The account of vm i is acct(i%7).
	account := func(v vm) string {
		var i int
		fmt.Sscanf(v.id, "vm%d", &i)
		return fmt.Sprintf("acct%d", i%7)
	}
	place := func(v vm) error {
		t0 := time.Now()
		m, n, err := c.PlaceMicrovm(ctx, account(v), v.id, store.Placement{MemoryMiB: v.mib, Platform: v.platform, Now: now})
		placeTime += time.Since(t0)
		if err != nil {
			return err
		}
		if m.Node != n.Name || n.Platform != v.platform || n.CommittedMiB > n.CapacityMiB {
			t.Fatalf("%s (%s, %d MiB) placed on %+v", v.id, v.platform, v.mib, n)
		}
		placed = append(placed, v)
		placedOn[v.id] = n.Name
		return nil
	}

	// Phase 1: room for all.
	for _, v := range vms[:phase1] {
		if err := place(v); err != nil {
			t.Fatalf("phase 1: %s (%s, %d MiB) refused: %v", v.id, v.platform, v.mib, err)
		}
	}
	ns, err := c.ListNodes(ctx)
	must(t, err)
	checkNodes(t, c, ns, platformOf)
	for _, p := range []string{"x86", "arm"} {
		lo, hi := int64(1<<62), int64(0)
		for _, n := range ns {
			if n.Platform == p {
				free := n.CapacityMiB - n.CommittedMiB
				lo, hi = min(lo, free), max(hi, free)
			}
		}
		t.Logf("phase 1, %s: free memory from %d to %d MiB (spread %d, bound %d)", p, lo, hi, hi-lo, sizes[len(sizes)-1])
		if hi-lo > sizes[len(sizes)-1] {
			t.Errorf("phase 1, %s: free memory spread %d MiB, more than the largest microVM", p, hi-lo)
		}
	}
	for _, cl := range classes {
		lo, hi := int64(1<<62), int64(0)
		for _, n := range ns {
			if n.Platform == cl.platform && n.CapacityMiB == cl.gib<<10 {
				lo, hi = min(lo, n.CommittedMiB), max(hi, n.CommittedMiB)
			}
		}
		ratio := float64(hi) / float64(max(lo, 1))
		t.Logf("phase 1, %d %s nodes of %d GiB: committed %d to %d MiB (%.0f%% to %.0f%%), ratio %.3f (bound 1.25)",
			cl.count, cl.platform, cl.gib, lo, hi, 100*float64(lo)/float64(cl.gib<<10), 100*float64(hi)/float64(cl.gib<<10), ratio)
		if ratio > 1.25 {
			t.Errorf("phase 1: %s nodes of %d GiB committed %d to %d MiB: ratio %.3f > 1.25", cl.platform, cl.gib, lo, hi, ratio)
		}
	}

	// Phase 2: microVMs end, a node is cordoned and one is lost, and
	// memory runs out.
	cordoned, lostNode := "x86-48-0", "arm-32-0"
	must(t, c.SetNodeCordoned(ctx, cordoned, true))
	before := map[string]int64{}
	for _, n := range ns {
		before[n.Name] = n.CommittedMiB
	}
	var lostVMs []vm
	for i, v := range vms[phase1:] {
		if rng.IntN(10) < 3 && len(placed) > 0 {
			j := rng.IntN(len(placed))
			terminate(t, s, account(placed[j]), placed[j].id, now)
			placed = slices.Delete(placed, j, j+1)
			ended++
		}
		if i == 100 {
			for _, p := range placed {
				if placedOn[p.id] == lostNode {
					lostVMs = append(lostVMs, p)
				}
			}
			must(t, c.RenewNodeLease(ctx, lostNode, now.Add(-time.Minute)))
			lost, err := c.ExpireNodes(ctx, now, 0)
			must(t, err)
			if !slices.Equal(lost, []string{lostNode}) {
				t.Fatalf("ExpireNodes = %v", lost)
			}
			placed = slices.DeleteFunc(placed, func(p vm) bool { return placedOn[p.id] == lostNode })
		}
		err := place(v)
		if err == nil {
			continue
		}
		if !errors.Is(err, errdefs.ErrExhausted) {
			t.Fatalf("phase 2: %s: %v", v.id, err)
		}
		refused++
		// Refused only if no node that may take it has room.
		ns, err := c.ListNodes(ctx)
		must(t, err)
		for _, n := range ns {
			if n.Platform == v.platform && n.State == store.NodeActive && !n.Cordoned && n.CapacityMiB-n.CommittedMiB >= v.mib {
				t.Fatalf("phase 2: %s (%s, %d MiB) refused while %s had %d MiB free: %v", v.id, v.platform, v.mib, n.Name, n.CapacityMiB-n.CommittedMiB, err)
			}
		}
	}
	ns, err = c.ListNodes(ctx)
	must(t, err)
	checkNodes(t, c, ns, platformOf)
	var committed, capacityAll int64
	for _, n := range ns {
		switch n.Name {
		case cordoned:
			if n.CommittedMiB > before[n.Name] {
				t.Errorf("the cordoned node went from %d to %d MiB", before[n.Name], n.CommittedMiB)
			}
		case lostNode:
			if n.State != store.NodeLost || n.CommittedMiB != 0 {
				t.Errorf("the lost node: %+v", n)
			}
		default:
			committed += n.CommittedMiB
			capacityAll += n.CapacityMiB
		}
	}
	for _, v := range lostVMs {
		m, err := s.GetMicrovm(ctx, account(v), v.id)
		must(t, err)
		if m.State != store.StateTerminated || !strings.HasPrefix(m.StateReason, store.ReasonHostLost) || m.Node != lostNode {
			t.Errorf("%s of the lost node: %s %q on %s", v.id, m.State, m.StateReason, m.Node)
		}
	}
	if refused == 0 {
		t.Errorf("phase 2 refused nothing: memory never ran out, the refusals went untested")
	}
	t.Logf("phase 2: %d placed, %d refused, %d ended, %d lost with %s; the %d usable nodes %.1f%% committed (%d of %d MiB)",
		total-phase1-refused, refused, ended, len(lostVMs), lostNode, len(ns)-2, 100*float64(committed)/float64(capacityAll), committed, capacityAll)
	t.Logf("%d PlaceMicrovm calls in %v (%v each); whole run %v", total, placeTime.Round(time.Millisecond),
		(placeTime / time.Duration(total)).Round(time.Microsecond), time.Since(start).Round(time.Millisecond))
}

// checkNodes: no node is over-committed, its committed memory is that of
// the microVMs it lists, and they are of its platform (platformOf: of
// each microVM).
func checkNodes(t *testing.T, c store.Cluster, ns []store.Node, platformOf map[string]string) {
	t.Helper()
	for _, n := range ns {
		vms, err := c.ListNodeMicrovms(ctx, n.Name)
		must(t, err)
		var sum int64
		for _, m := range vms {
			sum += m.MemoryMiB
			if platformOf[m.ID] != n.Platform {
				t.Errorf("%s of platform %q runs on %s of %q", m.ID, platformOf[m.ID], n.Name, n.Platform)
			}
		}
		if n.CommittedMiB > n.CapacityMiB || sum != n.CommittedMiB {
			t.Errorf("node %s (%s): %d MiB committed of %d, its %d microVMs have %d", n.Name, n.Platform, n.CommittedMiB, n.CapacityMiB, len(vms), sum)
		}
	}
}
