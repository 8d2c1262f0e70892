//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Agent returns the guest agent of a running microVM, for the handlers the
// endpoint proxy serves on the host (the shell, E2B's envd): it refuses a
// VM the engine does not run, so a record alone never reaches a guest.
func (e *Engine) Agent(ctx context.Context, id string) (*client.Client, error) {
	if e.lookup(id) == nil {
		return nil, proxy.ErrNotFound
	}
	return e.cfg.Driver.Agent(ctx, id)
}

// Changed returns a channel closed at the microVM's next change of state
// here (a resume's new agent session among them), or nil for a microVM
// this engine does not run. envd waits on it to adopt a paused sandbox's
// processes as soon as it runs again.
func (e *Engine) Changed(id string) <-chan struct{} {
	v := e.lookup(id)
	if v == nil {
		return nil
	}
	return v.waitChan()
}

// Usage measures a running microVM of this engine (E2B's metrics): a VM
// the engine does not run is not found, whatever the store says.
func (e *Engine) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	if e.lookup(id) == nil {
		return vmm.Usage{}, fmt.Errorf("microvm %s: %w", id, errdefs.ErrNotFound)
	}
	r, ok := e.cfg.Driver.(vmm.UsageReporter)
	if !ok {
		return vmm.Usage{}, fmt.Errorf("the VM driver cannot measure VMs: %w", errdefs.ErrUnavailable)
	}
	return r.Usage(ctx, id)
}

// SetEgressPolicy replaces a microVM's own egress policy (E2B's network
// rules) in its namespace, which lives from its start to its end,
// suspended or not. allowDomains ("example.com", "*.example.com") open
// the addresses the VM's DNS forwarder answers for them, each for its
// TTL (kept in memory: after a kiln restart they open nothing new until
// set again). ErrConflict for a microVM without internet egress: nothing
// leaves it, so there is nothing to allow or deny.
func (e *Engine) SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error {
	v := e.lookup(id)
	if v == nil {
		return fmt.Errorf("microvm %s: %w", id, errdefs.ErrNotFound)
	}
	if !v.egress {
		return fmt.Errorf("microvm %s has no internet egress: %w", id, errdefs.ErrConflict)
	}
	p.AllowLearned = len(allowDomains) > 0
	// The domains first: an answer between the two steps opens an address
	// the new rules accept, never one the old rules would not.
	v.mu.Lock()
	v.allowDomains = slices.Clone(allowDomains)
	v.mu.Unlock()
	err := netns.SetEgressPolicy(ctx, id, p)
	switch {
	case errors.Is(err, netns.ErrInvalid):
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	case errors.Is(err, netns.ErrNotFound):
		return fmt.Errorf("%w: %w", err, errdefs.ErrConflict)
	}
	return err
}

// learnAddrs is v's DNS forwarder's OnAnswer: the addresses of a name
// its policy allows become reachable for the answer's TTL.
func (e *Engine) learnAddrs(v *vmState) func(name string, addrs []netip.Addr, ttl time.Duration) {
	return func(name string, addrs []netip.Addr, ttl time.Duration) {
		v.mu.Lock()
		ok := slices.ContainsFunc(v.allowDomains, func(d string) bool { return domainMatches(d, name) })
		v.mu.Unlock()
		if !ok {
			return
		}
		if err := netns.AllowLearned(context.Background(), v.id, addrs, ttl); err != nil {
			slog.Debug("opening the addresses of an allowed domain", "microvm", v.id, "name", name, "err", err)
		}
	}
}

// domainMatches reports whether name (lowercase, no trailing dot) is the
// domain pattern d: "example.com" is that name only, "*.example.com" any
// name below it at any depth but not example.com itself (E2B's rule).
func domainMatches(d, name string) bool {
	if suffix, ok := strings.CutPrefix(d, "*."); ok {
		return strings.HasSuffix(name, "."+suffix)
	}
	return d == name
}
