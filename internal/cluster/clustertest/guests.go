package clustertest

import (
	"context"
	"net/netip"
	"sync"

	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// Guests stands in for a node engine's Lookup and RunningNow (what the
// tunnel server asks): which microVMs the node runs, at which guest
// address, and whether they run. Tests of the tunnel and the edge use
// it; the engine's own answers are tested in internal/engine.
type Guests struct {
	mu      sync.Mutex
	addr    map[string]netip.Addr
	stopped map[string]bool
}

// GuestAccount is the account every stand-in guest belongs to.
const GuestAccount = "111122223333"

// NewGuests is an empty node.
func NewGuests() *Guests {
	return &Guests{addr: map[string]netip.Addr{}, stopped: map[string]bool{}}
}

// Set makes the node run id at addr, running or not.
func (g *Guests) Set(id string, addr netip.Addr, running bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.addr[id] = addr
	g.stopped[id] = !running
}

// Remove makes the node forget id.
func (g *Guests) Remove(id string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.addr, id)
	delete(g.stopped, id)
}

func (g *Guests) Lookup(_ context.Context, id string) (proxy.Target, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	a, ok := g.addr[id]
	if !ok {
		return proxy.Target{}, proxy.ErrNotFound
	}
	return proxy.Target{Addr: a, Account: GuestAccount}, nil
}

func (g *Guests) RunningNow(id string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, ok := g.addr[id]
	return ok && !g.stopped[id]
}
