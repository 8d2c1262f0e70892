// Package edge is the endpoint proxy's backend in `kiln edge`: it finds
// the node that runs a microVM in the store (cached briefly), reaches the
// guest through that node's tunnel (internal/cluster/tunnel), asks the
// node to wake a microVM that is not running, and reports the traffic it
// carries to the nodes, whose idle timers cannot see it: the proxy keeps
// idle upstream connections (tunnels) open between requests.
package edge

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/tunnel"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Locator is what the edge reads from the store; store.Cluster has it.
type Locator interface {
	LocateMicrovm(ctx context.Context, id string) (store.Microvm, error)
	GetNode(ctx context.Context, name string) (store.Node, error)
}

// Waker makes a microVM that is not RUNNING run, on the node it is placed
// on (the node resumes it through its lifecycle service). It returns the
// proxy's errors so the client gets the right answer: proxy.ErrNotFound,
// proxy.ErrSuspended (auto-resume disabled), an errdefs.ErrExhausted, or
// ctx's.
type Waker interface {
	EnsureRunning(ctx context.Context, node store.Node, id string) error
}

// ActivityReporter tells a node when the edge last carried traffic for
// each of its microVMs (now, for those with requests open).
type ActivityReporter interface {
	Activity(ctx context.Context, node store.Node, seen map[string]time.Time) error
}

// Config configures a Backend.
type Config struct {
	Store Locator
	// TLS is the edge's client side of the cluster's mutual TLS: its
	// certificate and the cluster CA.
	TLS      *tls.Config
	Waker    Waker
	Activity ActivityReporter
	// RouteTTL is how long a microVM's route (node, state, access) is
	// used without reading the store again (default 5 s). A stale route
	// costs one more tunnel attempt, never a wrong guest: the node checks
	// the id.
	RouteTTL time.Duration
	// MaxRoutes bounds the route cache (default 65536).
	MaxRoutes int
	// ReportEvery is the activity report period (default 1 s).
	ReportEvery time.Duration
	Now         func() time.Time
	Logger      *slog.Logger
}

// Backend implements proxy.Backend and proxy.RunningNow for an edge.
type Backend struct {
	cfg Config

	mu     sync.Mutex
	routes map[string]route
	acts   map[string]*activity
	nodes  map[string]store.Node // last seen, for the activity reports
}

var (
	_ proxy.Backend    = (*Backend)(nil)
	_ proxy.RunningNow = (*Backend)(nil)
)

// route is what the store said of a microVM, and when.
type route struct {
	node    store.Node
	account string
	running bool
	ingress bool
	shell   bool
	at      time.Time
}

// activity is one microVM's traffic through this edge since it was last
// reported.
type activity struct {
	node string
	open int
	last time.Time
}

// New checks cfg.
func New(cfg Config) (*Backend, error) {
	if cfg.Store == nil || cfg.TLS == nil || cfg.Waker == nil || cfg.Activity == nil {
		return nil, errors.New("edge: store, TLS config, waker and activity reporter are required")
	}
	if cfg.RouteTTL <= 0 {
		cfg.RouteTTL = 5 * time.Second
	}
	if cfg.MaxRoutes <= 0 {
		cfg.MaxRoutes = 1 << 16
	}
	if cfg.ReportEvery <= 0 {
		cfg.ReportEvery = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Backend{cfg: cfg, routes: map[string]route{}, acts: map[string]*activity{}, nodes: map[string]store.Node{}}, nil
}

// Lookup implements proxy.Backend from the route cache, reading the
// store on a miss. It never changes the microVM's state.
func (b *Backend) Lookup(ctx context.Context, id string) (proxy.Target, error) {
	r, ok := b.cached(id)
	if !ok {
		var err error
		if r, err = b.locate(ctx, id); err != nil {
			return proxy.Target{}, err
		}
	}
	return proxy.Target{Account: r.account, Ingress: r.ingress, Shell: r.shell,
		Route: r.node.Name + "\x00" + id, Dial: b.dialer(id, r.node)}, nil
}

func (b *Backend) cached(id string) (route, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r, ok := b.routes[id]
	if !ok || b.cfg.Now().Sub(r.at) >= b.cfg.RouteTTL {
		return route{}, false
	}
	return r, true
}

// locate reads a microVM's route from the store and caches it. A
// microVM that is TERMINATED, TERMINATING or on no node has none.
func (b *Backend) locate(ctx context.Context, id string) (route, error) {
	m, err := b.cfg.Store.LocateMicrovm(ctx, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		b.forget(id)
		return route{}, proxy.ErrNotFound
	}
	if err != nil {
		return route{}, fmt.Errorf("edge: locating microVM %s in the store: %w", id, err)
	}
	if m.Node == "" || m.State == store.StateTerminated || m.State == store.StateTerminating {
		b.forget(id)
		return route{}, proxy.ErrNotFound
	}
	n, err := b.cfg.Store.GetNode(ctx, m.Node)
	if errors.Is(err, errdefs.ErrNotFound) {
		b.forget(id)
		return route{}, proxy.ErrNotFound
	}
	if err != nil {
		return route{}, fmt.Errorf("edge: reading node %s of microVM %s: %w", m.Node, id, err)
	}
	r := route{node: n, account: m.Account, running: m.State == store.StateRunning, at: b.cfg.Now()}
	r.ingress, r.shell = proxy.ConnectorAccess(m.IngressNetworkConnectors)
	b.mu.Lock()
	if len(b.routes) >= b.cfg.MaxRoutes {
		b.evictLocked()
	}
	b.routes[id] = r
	b.nodes[n.Name] = n
	b.mu.Unlock()
	return r, nil
}

// evictLocked makes room: expired routes first, then any (map order),
// down to 7/8 of MaxRoutes so that a full cache is not swept per miss.
func (b *Backend) evictLocked() {
	now := b.cfg.Now()
	for id, r := range b.routes {
		if now.Sub(r.at) >= b.cfg.RouteTTL {
			delete(b.routes, id)
		}
	}
	for id := range b.routes {
		if len(b.routes) < b.cfg.MaxRoutes*7/8 {
			break
		}
		delete(b.routes, id)
	}
}

func (b *Backend) forget(id string) {
	b.mu.Lock()
	delete(b.routes, id)
	b.mu.Unlock()
}

// dialer is a Target's Dial: a tunnel to the node of the route. A node
// that no longer has the microVM makes the edge read the store again and
// try the node it names now, once; a node that has it but not running
// (the cached state was stale: it was suspended meanwhile) makes the edge
// wake it and try once more. The tunnel header names the microVM, so
// whatever node answers, the connection reaches that microVM or none.
func (b *Backend) dialer(id string, node store.Node) func(ctx context.Context, port uint16) (net.Conn, error) {
	return func(ctx context.Context, port uint16) (net.Conn, error) {
		c, err := tunnel.Dial(ctx, node.TunnelAddr, b.cfg.TLS, id, port)
		switch {
		case errors.Is(err, tunnel.ErrNoSuchMicrovm):
			b.forget(id)
			r, lerr := b.locate(ctx, id)
			if lerr != nil {
				return nil, fmt.Errorf("%w; looking it up again: %w", err, lerr)
			}
			return b.retry(ctx, r.node, id, port)
		case errors.Is(err, tunnel.ErrUnavailable):
			b.forget(id)
			if werr := b.EnsureRunning(ctx, id); werr != nil {
				return nil, fmt.Errorf("%w; waking it: %w", err, werr)
			}
			r, ok := b.cached(id)
			if !ok {
				return nil, fmt.Errorf("%w: %w", proxy.ErrUnavailable, err)
			}
			return b.retry(ctx, r.node, id, port)
		case err != nil && !errors.Is(err, tunnel.ErrRefused):
			// The node did not answer (moved to another address, or
			// gone): the next request reads its record again.
			b.forget(id)
		}
		return c, err
	}
}

// retry is a dialer's second and last attempt. A node that still does not
// have the microVM, or has it not running, makes it unavailable for now
// (the store and the node disagree while a move or a state change
// settles), not a guest that fails to answer.
func (b *Backend) retry(ctx context.Context, node store.Node, id string, port uint16) (net.Conn, error) {
	c, err := tunnel.Dial(ctx, node.TunnelAddr, b.cfg.TLS, id, port)
	if errors.Is(err, tunnel.ErrNoSuchMicrovm) || errors.Is(err, tunnel.ErrUnavailable) {
		b.forget(id)
		return nil, fmt.Errorf("%w: %w", proxy.ErrUnavailable, err)
	}
	return c, err
}

// RunningNow implements proxy.RunningNow from the route cache: the store
// said RUNNING within RouteTTL.
func (b *Backend) RunningNow(id string) bool {
	r, ok := b.cached(id)
	return ok && r.running
}

// EnsureRunning implements proxy.Backend: the store's record decides;
// a microVM that is not RUNNING is woken by its node (Waker).
func (b *Backend) EnsureRunning(ctx context.Context, id string) error {
	b.forget(id) // the state is read afresh, not from the cache
	r, err := b.locate(ctx, id)
	if err != nil || r.running {
		return err
	}
	if err := b.cfg.Waker.EnsureRunning(ctx, r.node, id); err != nil {
		return err
	}
	r.running, r.at = true, b.cfg.Now()
	b.mu.Lock()
	b.routes[id] = r
	b.mu.Unlock()
	return nil
}

// ConnOpened implements proxy.Backend: the microVM is active until the
// matching ConnClosed.
func (b *Backend) ConnOpened(id string) {
	now := b.cfg.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	a := b.acts[id]
	if a == nil {
		a = &activity{}
		b.acts[id] = a
	}
	if r, ok := b.routes[id]; ok {
		a.node = r.node.Name
	}
	a.open++
	a.last = now
}

// ConnClosed implements proxy.Backend.
func (b *Backend) ConnClosed(id string) {
	now := b.cfg.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	if a := b.acts[id]; a != nil {
		if a.open > 0 {
			a.open--
		}
		a.last = now
	}
}

// Run reports activity every ReportEvery until ctx ends.
func (b *Backend) Run(ctx context.Context) {
	t := time.NewTicker(b.cfg.ReportEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.Report(ctx)
		}
	}
}

// Report sends each node the activity of its microVMs since the last
// report: now for microVMs with requests open, else the time the last
// one closed. A node that could not be told keeps its entries for the
// next report; the others' closed entries are dropped.
func (b *Backend) Report(ctx context.Context) {
	now := b.cfg.Now()
	byNode := map[string]map[string]time.Time{}
	b.mu.Lock()
	for id, a := range b.acts {
		if a.node == "" {
			if r, ok := b.routes[id]; ok {
				a.node = r.node.Name
			} else {
				continue // no route was ever found: no node to tell
			}
		}
		seen := a.last
		if a.open > 0 {
			seen = now
		}
		if byNode[a.node] == nil {
			byNode[a.node] = map[string]time.Time{}
		}
		byNode[a.node][id] = seen
	}
	nodes := make(map[string]store.Node, len(byNode))
	for name := range byNode {
		nodes[name] = b.nodes[name]
	}
	b.mu.Unlock()

	var wg sync.WaitGroup
	failed := make(chan string, len(byNode))
	rctx, cancel := context.WithTimeout(ctx, 2*b.cfg.ReportEvery)
	defer cancel()
	for name, seen := range byNode {
		wg.Go(func() {
			if err := b.cfg.Activity.Activity(rctx, nodes[name], seen); err != nil {
				b.cfg.Logger.Warn("edge: reporting activity to node failed; retrying with the next report", "node", name, "err", err)
				failed <- name
			}
		})
	}
	wg.Wait()
	close(failed)
	keep := map[string]bool{}
	for name := range failed {
		keep[name] = true
	}
	b.mu.Lock()
	for id, a := range b.acts {
		if a.open == 0 && !a.last.After(now) && !keep[a.node] {
			delete(b.acts, id)
		}
	}
	b.mu.Unlock()
}
