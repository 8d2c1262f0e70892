// Package control is the control plane's side of a kiln cluster: a
// lifecycle.Backend that places each microVM on a node (store.Cluster's
// PlaceMicrovm, one transaction) and hands the work to that node over
// noderpc, and the loops that must run once across control replicas
// (declaring silent nodes lost), held by a lease in the store.
//
// The life cycle itself (internal/lifecycle) is the same as on one host:
// it records each accepted request in the store, then calls this
// Backend; the node reports what happened straight to the store, under
// the placement epoch it was given.
package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Backend implements lifecycle.Backend for a cluster.
type Backend struct {
	st    store.ClusterStore
	nodes func(store.Node) (noderpc.Service, error)
	rep   *lifecycle.Reporter
	log   *slog.Logger
	now   func() time.Time
}

// New returns the cluster backend over st, reaching nodes through nodes.
func New(st store.ClusterStore, nodes noderpc.Dialer, log *slog.Logger) *Backend {
	if log == nil {
		log = slog.Default()
	}
	return &Backend{st: st, rep: lifecycle.NewReporter(st), log: log, now: time.Now,
		nodes: func(n store.Node) (noderpc.Service, error) { return nodes.Get(n) }}
}

var (
	_ lifecycle.HostAdmitter = (*Backend)(nil)
	_ lifecycle.Backend      = (*Backend)(nil)
	_ lifecycle.Recoverer    = (*Backend)(nil)
	_ lifecycle.Snapshotter  = (*Backend)(nil)
	_ lifecycle.LogSource    = (*Backend)(nil)
)

// TemplateKey names an image version's template in placement.
func TemplateKey(account, image, version string) string { return account + "/" + image + "/" + version }

// StartMicrovm places m and asks its node to start it.
func (b *Backend) StartMicrovm(ctx context.Context, m store.Microvm) error {
	mem := m.MemoryMiB
	if mem <= 0 {
		mem = lifecycle.DefaultMicrovmMemoryMiB
	}
	platform, err := b.platformOf(ctx, m)
	if err != nil {
		return err
	}
	placed, n, err := b.st.PlaceMicrovm(ctx, m.Account, m.ID, store.Placement{MemoryMiB: mem, Platform: platform,
		Template: TemplateKey(m.Account, m.ImageName, m.ImageVersion), Now: b.now()})
	if err != nil {
		return err
	}
	c, err := b.nodes(n)
	if err != nil {
		return err
	}
	return c.StartMicrovm(ctx, placed)
}

// platformOf is the platform a microVM's snapshot was made on: that of
// the node whose build of its version succeeded. A template restores only
// on a host of the same platform, so placement is limited to those. ""
// (any) for a version built before builds recorded their node.
// RunMicrovm copies the version's platform into m; the builds are read
// only for records made before it did.
func (b *Backend) platformOf(ctx context.Context, m store.Microvm) (string, error) {
	if m.Platform != "" {
		return m.Platform, nil
	}
	builds, _, err := b.st.ListBuilds(ctx, m.Account, m.ImageName, m.ImageVersion, store.Page{Limit: 100})
	if err != nil {
		return "", err
	}
	for _, bd := range builds {
		if bd.State != store.BuildSuccessful || bd.Node == "" {
			continue
		}
		n, err := b.st.GetNode(ctx, bd.Node)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue
		}
		if err != nil {
			return "", err
		}
		return n.Platform, nil
	}
	return "", nil
}

// liveNode returns the node m is placed on; ok is false when m was
// never placed or its node is lost (nothing runs it any more).
func (b *Backend) liveNode(ctx context.Context, m store.Microvm) (store.Node, bool, error) {
	if m.Node == "" {
		return store.Node{}, false, nil
	}
	n, err := b.st.GetNode(ctx, m.Node)
	if errors.Is(err, errdefs.ErrNotFound) {
		return store.Node{}, false, nil
	}
	if err != nil {
		return store.Node{}, false, err
	}
	return n, n.State != store.NodeLost, nil
}

// nodeOf is liveNode with the node's client.
func (b *Backend) nodeOf(ctx context.Context, m store.Microvm) (noderpc.Service, bool, error) {
	n, ok, err := b.liveNode(ctx, m)
	if !ok || err != nil {
		return nil, ok, err
	}
	c, err := b.nodes(n)
	return c, err == nil, err
}

// withNode runs call on m's node, or says why it cannot.
func (b *Backend) withNode(ctx context.Context, m store.Microvm, what string, call func(noderpc.Service) error) error {
	c, ok, err := b.nodeOf(ctx, m)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("cannot %s microvm %s: its node %q is gone: %w", what, m.ID, m.Node, errdefs.ErrConflict)
	}
	return call(c)
}

func (b *Backend) SuspendMicrovm(ctx context.Context, m store.Microvm) error {
	return b.withNode(ctx, m, "suspend", func(c noderpc.Service) error { return c.SuspendMicrovm(ctx, m) })
}

func (b *Backend) ResumeMicrovm(ctx context.Context, m store.Microvm) error {
	return b.withNode(ctx, m, "resume", func(c noderpc.Service) error { return c.ResumeMicrovm(ctx, m) })
}

func (b *Backend) SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error) {
	var sb store.SnapshotBuild
	err := b.withNode(ctx, m, "snapshot", func(c noderpc.Service) error {
		var err error
		sb, err = c.SnapshotMicrovm(ctx, m, image, version)
		return err
	})
	return sb, err
}

// Usage implements e2b.Meter: m's node measures it.
func (b *Backend) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	m, err := b.st.LocateMicrovm(ctx, id)
	if err != nil {
		return vmm.Usage{}, err
	}
	var u vmm.Usage
	err = b.withNode(ctx, m, "measure", func(c noderpc.Service) (err error) {
		u, err = c.Usage(ctx, id)
		return err
	})
	return u, err
}

// SetEgressPolicy implements e2b.Policer on m's node, where its network
// namespace is.
func (b *Backend) SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error {
	m, err := b.st.LocateMicrovm(ctx, id)
	if err != nil {
		return err
	}
	return b.withNode(ctx, m, "set the network rules of", func(c noderpc.Service) error {
		return c.SetEgressPolicy(ctx, id, p, allowDomains)
	})
}

func (b *Backend) MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	var data []byte
	next := offset
	err := b.withNode(ctx, m, "read the log of", func(c noderpc.Service) (err error) {
		data, next, err = c.MicrovmLog(ctx, m, offset, limit)
		return err
	})
	return data, next, err
}

// TerminateMicrovm asks m's node to end it; one never placed, or on a lost
// node, has nothing left to stop and is reported TERMINATED here.
func (b *Backend) TerminateMicrovm(ctx context.Context, m store.Microvm) error {
	c, ok, err := b.nodeOf(ctx, m)
	if err != nil {
		return err
	}
	if ok {
		return c.TerminateMicrovm(ctx, m)
	}
	reason := m.StateReason
	if m.Node != "" {
		reason = store.ReasonHostLost + ": node " + m.Node + " was lost"
	}
	_, err = b.rep.MicrovmState(context.WithoutCancel(ctx), m.Account, m.ID, []store.MicrovmState{store.StateTerminating}, store.StateTerminated, reason)
	if errors.Is(err, errdefs.ErrConflict) {
		return nil // terminated meanwhile
	}
	return err
}

// AdmitMemory implements lifecycle.HostAdmitter: a RunMicrovm that no
// node has room for is refused before anything is recorded, as on one
// host. Placement checks again, in its transaction.
func (b *Backend) AdmitMemory(ctx context.Context, memMiB int64) error {
	nodes, err := b.st.ListNodes(ctx)
	if err != nil {
		return err
	}
	now := b.now()
	var most int64
	for _, n := range nodes {
		if n.State != store.NodeActive || n.Cordoned || !n.LeaseExpiresAt.After(now) {
			continue
		}
		free := n.CapacityMiB - n.CommittedMiB
		if free >= memMiB {
			return nil
		}
		most = max(most, free)
	}
	return fmt.Errorf("no node can take %d MiB now (most free on a live node: %d MiB); add nodes or capacity, uncordon a node, or terminate microVMs: %w",
		memMiB, most, errdefs.ErrExhausted)
}

// buildNode chooses the node for a build: an active, uncordoned node with
// a live lease and the most free memory.
func (b *Backend) buildNode(ctx context.Context) (store.Node, error) {
	nodes, err := b.st.ListNodes(ctx)
	if err != nil {
		return store.Node{}, err
	}
	now := b.now()
	var ok []store.Node
	for _, n := range nodes {
		if n.State == store.NodeActive && !n.Cordoned && n.LeaseExpiresAt.After(now) {
			ok = append(ok, n)
		}
	}
	if len(ok) == 0 {
		return store.Node{}, fmt.Errorf("no node can take a build: none is active, uncordoned and renewing its lease (start `kiln node` on a host): %w", errdefs.ErrExhausted)
	}
	sort.SliceStable(ok, func(i, j int) bool {
		return ok[i].CapacityMiB-ok[i].CommittedMiB > ok[j].CapacityMiB-ok[j].CommittedMiB
	})
	return ok[0], nil
}

// BuildImage gives the version's builds to one node, recording which in
// each build first, so that a restart knows whose they are.
func (b *Backend) BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error {
	n, err := b.buildNode(ctx)
	if err != nil {
		return err
	}
	for i := range builds {
		builds[i].Node, builds[i].Platform = n.Name, n.Platform
		if err := b.st.UpdateBuild(ctx, builds[i]); err != nil {
			return fmt.Errorf("recording build %s on node %s: %w", builds[i].ID, n.Name, err)
		}
	}
	c, err := b.nodes(n)
	if err != nil {
		return err
	}
	return c.BuildImage(ctx, v, builds)
}

// DeleteImageVersion asks every node that is not lost to drop the
// version's files (any of them may hold its template).
func (b *Backend) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	nodes, err := b.st.ListNodes(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range nodes {
		if n.State == store.NodeLost {
			continue
		}
		c, err := b.nodes(n)
		if err == nil {
			err = c.DeleteImageVersion(ctx, account, image, version)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Recover handles, after a control start, the unfinished work no node
// owns: microVMs never placed (started again, which places them),
// terminations whose node is gone, and builds never given to a node or
// whose node is lost. Work a live node owns is that node's to recover.
func (b *Backend) Recover(ctx context.Context, vms []store.Microvm, builds []store.Build) error {
	var errs []error
	for _, m := range vms {
		_, live, err := b.liveNode(ctx, m)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		switch {
		case live:
		case m.State == store.StatePending && m.Node == "":
			if err := b.StartMicrovm(ctx, m); err != nil {
				_, rerr := b.rep.MicrovmState(context.WithoutCancel(ctx), m.Account, m.ID, []store.MicrovmState{store.StatePending},
					store.StateTerminated, "StartFailed: "+err.Error())
				errs = append(errs, rerr)
			}
		case m.State == store.StateTerminating || m.Node != "":
			_, err := b.rep.MicrovmState(context.WithoutCancel(ctx), m.Account, m.ID, nil, store.StateTerminated,
				store.ReasonHostLost+": node "+m.Node+" was lost")
			if err != nil && !errors.Is(err, errdefs.ErrConflict) {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, b.RedoOrphanBuilds(ctx, builds))
	return errors.Join(errs...)
}

// RedoOrphanBuilds gives again the builds among builds whose node is not
// an active one (never given, or lost).
func (b *Backend) RedoOrphanBuilds(ctx context.Context, builds []store.Build) error {
	var orphans []store.Build
	for _, bd := range builds {
		if bd.Node != "" {
			n, err := b.st.GetNode(ctx, bd.Node)
			if err == nil && n.State == store.NodeActive {
				continue
			}
		}
		orphans = append(orphans, bd)
	}
	return lifecycle.RedoBuilds(ctx, b.st, orphans, b.BuildImage)
}
