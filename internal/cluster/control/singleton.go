package control

import (
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// Lease names of the work that runs on one control replica at a time.
const (
	// LeaseTimers: the life cycle's deadline controller (idle retention,
	// maximum duration).
	LeaseTimers = "lifecycle-timers"
	// LeaseNodes: declaring nodes lost.
	LeaseNodes = "node-expiry"
)

// Singleton reports whether this replica holds a lease, renewing it as
// it asks: Held takes the lease when it is free or expired and keeps it
// while the replica asks again within TTL. A replica that cannot reach
// the store holds nothing, so another may take over once the lease
// runs out.
type Singleton struct {
	St     store.Cluster
	Name   string
	Holder string
	TTL    time.Duration
	Now    func() time.Time
}

// Held asks the store; it is called before each round of the work.
func (s *Singleton) Held(ctx context.Context) bool {
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	t := now()
	ok, err := s.St.AcquireLease(ctx, s.Name, s.Holder, t.Add(s.TTL), t)
	if err != nil {
		slog.Warn("cluster lease: the store does not answer; this replica holds nothing", "lease", s.Name, "err", err)
		return false
	}
	return ok
}

// Release gives the lease up (a clean shut-down), so another replica
// need not wait for it to run out.
func (s *Singleton) Release(ctx context.Context) {
	_ = s.St.ReleaseLease(ctx, s.Name, s.Holder)
}

// NodeReaper declares lost the nodes that stopped renewing their leases.
// A store outage must not kill the fleet: every node's lease runs out
// while nobody can renew, so the reaper acts only after it has itself
// reached the store without a break for longer than a lease plus the
// grace, which gives every live node time to renew first.
type NodeReaper struct {
	St      store.ClusterStore
	Backend *Backend
	Lease   *Singleton
	// NodeLease is how long a node's lease lasts; Grace how long after its
	// end the node is declared lost.
	NodeLease, Grace time.Duration
	Every            time.Duration
	Now              func() time.Time

	healthySince time.Time
}

// Run loops until ctx ends.
func (r *NodeReaper) Run(ctx context.Context) {
	t := time.NewTicker(r.Every)
	defer t.Stop()
	defer r.Lease.Release(context.WithoutCancel(ctx))
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.Once(ctx)
	}
}

// Once is one round: returns the nodes declared lost.
func (r *NodeReaper) Once(ctx context.Context) []string {
	now := time.Now
	if r.Now != nil {
		now = r.Now
	}
	if _, err := r.St.ListNodes(ctx); err != nil {
		r.healthySince = time.Time{}
		return nil
	}
	t := now()
	if r.healthySince.IsZero() {
		r.healthySince = t
	}
	if t.Sub(r.healthySince) < r.NodeLease+r.Grace || !r.Lease.Held(ctx) {
		return nil
	}
	r.startOrphans(ctx, t)
	lost, err := r.St.ExpireNodes(ctx, t, r.Grace)
	if err != nil {
		slog.Error("declaring silent nodes lost", "err", err)
		return nil
	}
	if len(lost) == 0 {
		return nil
	}
	slog.Warn("nodes declared lost: their microvms are terminated (HostLost)", "nodes", lost)
	// Their unfinished builds go to other nodes. Only theirs: a build not
	// yet given to any node is being given by the replica that took it.
	builds, err := r.St.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
	if err == nil {
		builds = slices.DeleteFunc(builds, func(b store.Build) bool { return !slices.Contains(lost, b.Node) })
		err = r.Backend.RedoOrphanBuilds(ctx, builds)
	}
	if err != nil {
		slog.Error("giving the builds of lost nodes to others", "err", err)
	}
	return lost
}

// orphanAge is how long a microVM may stay PENDING without a node before
// a replica places it: the replica that recorded it died before placing.
const orphanAge = 30 * time.Second

// startOrphans places the PENDING microVMs no node was chosen for.
func (r *NodeReaper) startOrphans(ctx context.Context, now time.Time) {
	pending, err := r.St.ListMicrovmsInState(ctx, 100, store.StatePending)
	if err != nil || r.Backend == nil {
		return
	}
	for _, m := range pending {
		if m.Node != "" || now.Sub(m.UpdatedAt) < orphanAge {
			continue
		}
		slog.Warn("placing a microvm whose replica died before placing it", "microvm", m.ID)
		if err := r.Backend.StartMicrovm(ctx, m); err != nil {
			_, err = r.Backend.rep.MicrovmState(context.WithoutCancel(ctx), m.Account, m.ID, []store.MicrovmState{store.StatePending},
				store.StateTerminated, "StartFailed: "+err.Error())
			if err != nil {
				slog.Warn("ending an orphaned microvm", "microvm", m.ID, "err", err)
			}
		}
	}
}
