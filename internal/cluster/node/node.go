// Package node is a cluster host's membership: it registers the host's
// engine in the store with its capacity and platform, renews its lease,
// recovers and reconciles what the engine runs against what the store
// says the host should run, and serves the engine to control and edges
// (noderpc.Service).
//
// Failure rules (docs/CLUSTER.md): a node that cannot reach the store
// pauses (accepts no new start, resume or build) and never kills a VM for
// that; a node that finds itself declared lost registers again and ends
// the VMs whose records were terminated meanwhile.
package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Engine is what a node runs: internal/engine.
type Engine interface {
	lifecycle.Backend
	lifecycle.Snapshotter
	lifecycle.LogSource
	lifecycle.Recoverer
	EnsureRunning(ctx context.Context, id string) error
	MarkActive(id string, t time.Time)
	Templates() ([]string, error)
	Owned() []string
	ExportTemplate(ctx context.Context, account, image, version string, app func(*engine.AppConfig) error, emit func(vmm.TemplatePart) error) error
	Usage(ctx context.Context, id string) (vmm.Usage, error)
	SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error
}

// Config describes the host.
type Config struct {
	Store  store.ClusterStore
	Engine Engine
	// Name, addresses, platform and capacity as registered (store.Node).
	Name, RPCAddr, TunnelAddr, Platform string
	CapacityMiB                         int64
	// LeaseTTL is how long one renewal lasts (default 10s); the node
	// renews three times per TTL.
	LeaseTTL time.Duration
	Log      *slog.Logger
	Now      func() time.Time
}

// Node is a running member.
type Node struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	renewedAt time.Time // last lease renewal the store accepted
}

// New returns the member; Run makes it one.
func New(cfg Config) (*Node, error) {
	if cfg.Store == nil || cfg.Engine == nil || cfg.Name == "" || cfg.RPCAddr == "" {
		return nil, fmt.Errorf("node: store, engine, name and rpc address are required: %w", errdefs.ErrInvalid)
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Node{cfg: cfg, log: cfg.Log.With("node", cfg.Name)}, nil
}

// Run registers the node (waiting for the store if it must), recovers its
// unfinished work, then renews its lease and reconciles until ctx ends.
func (n *Node) Run(ctx context.Context) {
	for !n.register(ctx) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(n.cfg.LeaseTTL / 3):
		}
	}
	n.recover(ctx)
	t := time.NewTicker(n.cfg.LeaseTTL / 3)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n.renew(ctx)
		if i%3 == 2 {
			n.reconcile(ctx)
		}
	}
}

func (n *Node) register(ctx context.Context) bool {
	now := n.cfg.Now()
	_, err := n.cfg.Store.RegisterNode(ctx, store.Node{Name: n.cfg.Name, RPCAddr: n.cfg.RPCAddr, TunnelAddr: n.cfg.TunnelAddr,
		Platform: n.cfg.Platform, CapacityMiB: n.cfg.CapacityMiB, LeaseExpiresAt: now.Add(n.cfg.LeaseTTL)})
	if err != nil {
		n.log.Warn("registering with the cluster store failed; retrying", "err", err)
		return false
	}
	n.setRenewed(now)
	n.publishTemplates(ctx)
	n.log.Info("registered with the cluster", "rpc", n.cfg.RPCAddr, "tunnel", n.cfg.TunnelAddr, "capacity_mib", n.cfg.CapacityMiB)
	return true
}

func (n *Node) setRenewed(t time.Time) {
	n.mu.Lock()
	n.renewedAt = t
	n.mu.Unlock()
}

// Paused reports whether the node has gone a lease without reaching the
// store: it then takes no new work.
func (n *Node) Paused() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cfg.Now().Sub(n.renewedAt) > n.cfg.LeaseTTL
}

func (n *Node) renew(ctx context.Context) {
	now := n.cfg.Now()
	err := n.cfg.Store.RenewNodeLease(ctx, n.cfg.Name, now.Add(n.cfg.LeaseTTL))
	switch {
	case err == nil:
		n.setRenewed(now)
		n.publishTemplates(ctx)
	case errors.Is(err, errdefs.ErrConflict), errors.Is(err, errdefs.ErrNotFound):
		n.log.Warn("this node was declared lost (or removed): registering again; its microvms were terminated", "err", err)
		if n.register(ctx) {
			n.reconcile(ctx)
		}
	default:
		if n.Paused() {
			n.log.Warn("cannot reach the cluster store: paused (no new work; running microvms are kept)", "err", err)
		}
	}
}

func (n *Node) publishTemplates(ctx context.Context) {
	ts, err := n.cfg.Engine.Templates()
	if err == nil {
		err = n.cfg.Store.SetNodeTemplates(ctx, n.cfg.Name, ts)
	}
	if err != nil {
		n.log.Warn("publishing the templates this node holds", "err", err)
	}
}

// recover hands the engine the records placed here and the builds given
// here that are unfinished, as `kiln server` hands it all of them.
func (n *Node) recover(ctx context.Context) {
	vms, err := n.cfg.Store.ListNodeMicrovms(ctx, n.cfg.Name)
	if err != nil {
		n.log.Error("listing this node's microvms to recover", "err", err)
		return
	}
	builds, err := n.cfg.Store.ListBuildsInState(ctx, store.BuildPending, store.BuildInProgress)
	if err != nil {
		n.log.Error("listing builds to recover", "err", err)
		return
	}
	builds = slices.DeleteFunc(builds, func(b store.Build) bool { return b.Node != n.cfg.Name })
	if err := n.cfg.Engine.Recover(ctx, vms, builds); err != nil {
		n.log.Error("recovering this node's work", "err", err)
	}
}

// stale is how long a transition may wait for its call before the node
// takes it up itself: control records a transition, then calls the node,
// and may die in between.
const stale = 15 * time.Second

// reconcile brings what the engine holds in line with what the store
// places here. It ends a microVM whose record was terminated (the node
// was declared lost, or a terminate came while it could not be reached)
// or placed elsewhere; and it takes up a transition recorded for a
// microVM here whose call never came (control died between the record
// and the call): a start, a terminate or a resume.
func (n *Node) reconcile(ctx context.Context) {
	mine, err := n.cfg.Store.ListNodeMicrovms(ctx, n.cfg.Name)
	if err != nil {
		return
	}
	owned := map[string]bool{}
	for _, id := range n.cfg.Engine.Owned() {
		owned[id] = true
	}
	placed := make(map[string]bool, len(mine))
	now := n.cfg.Now()
	for _, m := range mine {
		placed[m.ID] = true
		if now.Sub(m.UpdatedAt) < stale {
			continue
		}
		var err error
		switch {
		case m.State == store.StatePending && !owned[m.ID]:
			n.log.Warn("starting a microvm placed here whose start never came", "microvm", m.ID)
			err = n.cfg.Engine.StartMicrovm(ctx, m)
		case m.State == store.StateTerminating:
			n.log.Warn("ending a microvm whose terminate never came", "microvm", m.ID)
			err = n.cfg.Engine.TerminateMicrovm(ctx, m)
		case m.State == store.StateSuspended && m.PendingOp == "resume":
			n.log.Warn("resuming a microvm whose resume never came", "microvm", m.ID)
			err = n.cfg.Engine.ResumeMicrovm(ctx, m)
		}
		if err != nil {
			n.log.Warn("taking up a transition", "microvm", m.ID, "err", err)
		}
	}
	for id := range owned {
		if placed[id] {
			continue
		}
		m, err := n.cfg.Store.LocateMicrovm(ctx, id)
		if errors.Is(err, errdefs.ErrNotFound) {
			m = store.Microvm{ID: id, State: store.StateTerminated}
		} else if err != nil {
			continue
		}
		if m.State != store.StateTerminated && m.Node == n.cfg.Name {
			continue // listed after the query above
		}
		n.log.Warn("ending a microvm the store no longer places here", "microvm", id, "state", m.State, "placed_on", m.Node)
		m.Node, m.Epoch = n.cfg.Name, -1 // its reports are refused: the record is not ours
		if err := n.cfg.Engine.TerminateMicrovm(ctx, m); err != nil {
			n.log.Warn("ending a stale microvm", "microvm", id, "err", err)
		}
	}
}

// Service is the node's noderpc.Service: the engine, behind the checks
// that the work is this node's and that the node is not paused.
func (n *Node) Service() noderpc.Service { return service{n} }

type service struct{ n *Node }

var _ noderpc.Service = service{}

func (s service) check(m store.Microvm, newWork bool) error {
	if m.Node != s.n.cfg.Name {
		return fmt.Errorf("microvm %s is placed on node %q, not on %s: %w", m.ID, m.Node, s.n.cfg.Name, errdefs.ErrInvalid)
	}
	if newWork && s.n.Paused() {
		return fmt.Errorf("node %s cannot reach the cluster store and takes no new work until it can: %w", s.n.cfg.Name, errdefs.ErrUnavailable)
	}
	return nil
}

func (s service) StartMicrovm(ctx context.Context, m store.Microvm) error {
	if err := s.check(m, true); err != nil {
		return err
	}
	return s.n.cfg.Engine.StartMicrovm(ctx, m)
}

func (s service) ResumeMicrovm(ctx context.Context, m store.Microvm) error {
	if err := s.check(m, true); err != nil {
		return err
	}
	return s.n.cfg.Engine.ResumeMicrovm(ctx, m)
}

func (s service) SuspendMicrovm(ctx context.Context, m store.Microvm) error {
	if err := s.check(m, false); err != nil {
		return err
	}
	return s.n.cfg.Engine.SuspendMicrovm(ctx, m)
}

func (s service) TerminateMicrovm(ctx context.Context, m store.Microvm) error {
	if err := s.check(m, false); err != nil {
		return err
	}
	return s.n.cfg.Engine.TerminateMicrovm(ctx, m)
}

func (s service) SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error) {
	if err := s.check(m, true); err != nil {
		return store.SnapshotBuild{}, err
	}
	return s.n.cfg.Engine.SnapshotMicrovm(ctx, m, image, version)
}

func (s service) MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	if err := s.check(m, false); err != nil {
		return nil, offset, err
	}
	return s.n.cfg.Engine.MicrovmLog(ctx, m, offset, limit)
}

func (s service) BuildImage(ctx context.Context, v store.ImageVersion, builds []store.Build) error {
	for _, b := range builds {
		if b.Node != s.n.cfg.Name {
			return fmt.Errorf("build %s was given to node %q, not to %s: %w", b.ID, b.Node, s.n.cfg.Name, errdefs.ErrInvalid)
		}
	}
	if s.n.Paused() {
		return fmt.Errorf("node %s cannot reach the cluster store and takes no new work until it can: %w", s.n.cfg.Name, errdefs.ErrUnavailable)
	}
	return s.n.cfg.Engine.BuildImage(ctx, v, builds)
}

func (s service) DeleteImageVersion(ctx context.Context, account, image, version string) error {
	return s.n.cfg.Engine.DeleteImageVersion(ctx, account, image, version)
}

// EnsureRunning gives the proxy's answers categories that cross the
// wire (noderpc keeps errdefs categories): not found, suspended without
// auto-resume (a conflict), cannot run now.
func (s service) EnsureRunning(ctx context.Context, id string) error {
	err := s.n.cfg.Engine.EnsureRunning(ctx, id)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, proxy.ErrNotFound):
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case errors.Is(err, proxy.ErrSuspended):
		return fmt.Errorf("%w: %w", err, errdefs.ErrConflict)
	case errors.Is(err, proxy.ErrUnavailable):
		return fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
	}
	return err
}

func (s service) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	return s.n.cfg.Engine.Usage(ctx, id)
}

func (s service) SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error {
	return s.n.cfg.Engine.SetEgressPolicy(ctx, id, p, allowDomains)
}

func (s service) Activity(_ context.Context, seen map[string]time.Time) error {
	for id, t := range seen {
		s.n.cfg.Engine.MarkActive(id, t)
	}
	return nil
}

func (s service) ExportTemplate(ctx context.Context, account, image, version string, send func(*noderpc.TemplateChunk) error) error {
	var first *noderpc.TemplateChunk
	return s.n.cfg.Engine.ExportTemplate(ctx, account, image, version, func(app *engine.AppConfig) error {
		first = &noderpc.TemplateChunk{}
		if app != nil {
			b, err := json.Marshal(app)
			if err != nil {
				return err
			}
			first.App = b
		}
		return nil
	}, func(p vmm.TemplatePart) error {
		if first != nil {
			first.Part, p = p, vmm.TemplatePart{}
			c := first
			first = nil
			return send(c)
		}
		return send(&noderpc.TemplateChunk{Part: p})
	})
}

// TemplateFetcher is the engine's engine.TemplateFetcher on a cluster
// node: it asks each other active node in turn for the template, and
// imports the first that has it. What a peer sends is checked by the
// driver's import (vmm.TemplatePorter) and the app settings here.
func TemplateFetcher(st store.ClusterStore, self string, peers noderpc.Dialer, log *slog.Logger) engine.TemplateFetcher {
	return func(ctx context.Context, account, image, version string, imp engine.TemplateImport) error {
		nodes, err := st.ListNodes(ctx)
		if err != nil {
			return err
		}
		var errs []error
		for _, n := range nodes {
			if n.Name == self || n.State != store.NodeActive {
				continue
			}
			c, err := peers.Get(n)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			err = c.FetchTemplate(ctx, account, image, version, func(next func() (*noderpc.TemplateChunk, error)) error {
				first, err := next()
				if err != nil {
					return err
				}
				var app *engine.AppConfig
				if len(first.App) > 0 {
					app = new(engine.AppConfig)
					if len(first.App) > engine.MaxAppFile || json.Unmarshal(first.App, app) != nil {
						return fmt.Errorf("node %s sent malformed app settings: %w", n.Name, errdefs.ErrInvalid)
					}
				}
				pending := &first.Part
				return imp(app, func() (vmm.TemplatePart, error) {
					if pending != nil {
						p := *pending
						pending = nil
						return p, nil
					}
					ch, err := next()
					if err != nil {
						return vmm.TemplatePart{}, err
					}
					return ch.Part, nil
				})
			})
			if err == nil {
				log.Info("fetched a template from another node", "from", n.Name, "image", image, "version", version)
				return nil
			}
			if ctx.Err() != nil {
				return err
			}
			errs = append(errs, err)
		}
		if len(errs) == 0 {
			return fmt.Errorf("no other node is active to fetch the template from: %w", errdefs.ErrNotFound)
		}
		return errors.Join(errs...)
	}
}
