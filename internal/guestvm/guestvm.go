// Package guestvm owns one guest VM together with what it needs around it
// on the host: its network namespace (internal/netns), the DNS forwarder at
// its gateway when it has egress (internal/dnsfwd), listeners the caller
// serves in its namespace (the metadata service, the package proxy), and
// the VM itself (vmm.Driver). They are made in that order and undone in the
// reverse one by a single Close, so that no caller assembles, or forgets to
// undo, one of them by hand.
//
// The namespace and the VM outlive the process (a restarted kiln adopts
// them: Open, AdoptVM); the forwarder and the listeners live in the process
// and are started again by Ensure.
package guestvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/dnsfwd"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// CloseTimeout bounds Close. Close does not take a context: clean-up must
// run to the end also when the work that made the VM was cancelled.
const CloseTimeout = 60 * time.Second

// ErrClosed: the VM was closed; make a new one.
var ErrClosed = errors.New("guest vm closed")

// Step names, as StepError reports them.
const (
	StepNetwork = "network"
	StepDNS     = "dns forwarder"
	StepVM      = "vm"
)

// Config says what to make for one VM.
type Config struct {
	// ID names the VM in the driver and its network (netns.Config.ID).
	ID     string
	Driver vmm.Driver
	// Net is the network's config; its ID is set from ID. With Egress a
	// DNS forwarder runs at the guest's gateway (netns resolves nothing
	// else for the guest).
	Net netns.Config
	// Adopt takes over a namespace of ID that already exists (one that
	// outlived a restart of kiln) instead of failing with netns.ErrExists.
	Adopt bool
	// Template, when the driver is a vmm.PoolReserver and Net.Spare is
	// unset, makes the network around a clone process that the driver
	// started ahead for this template (see vmm.PoolReserver): the clone
	// that follows then moves nothing between namespaces.
	Template string
	// Upstreams and OnAnswer are the DNS forwarder's (dnsfwd.Config).
	Upstreams []string
	OnAnswer  func(name string, addrs []netip.Addr, ttl time.Duration)
	// Services are started in the namespace after the forwarder, in order,
	// and closed before it, in reverse.
	Services []Service
}

// Service is a listener the caller serves in the VM's namespace. Start
// may return a nil Closer and no error: the service is then not running
// and the next Ensure tries again (the metadata service of a VM that can
// do without it).
type Service struct {
	Name  string
	Start func(ctx context.Context, n *netns.Net) (io.Closer, error)
}

// StepError is the failure of one clean-up step.
type StepError struct {
	ID, Step string
	Err      error
}

func (e *StepError) Error() string { return fmt.Sprintf("%s of %s: %v", e.Step, e.ID, e.Err) }
func (e *StepError) Unwrap() error { return e.Err }

// Failed reports whether err (from Close or Remove) holds a failure of
// step: for example a network that may still be there.
func Failed(err error, step string) bool {
	for _, e := range flatten(err) {
		var se *StepError
		if errors.As(e, &se) && se.Step == step {
			return true
		}
	}
	return false
}

func flatten(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	if err == nil {
		return nil
	}
	return []error{err}
}

// VM is one guest VM and what surrounds it. Its methods are safe for
// concurrent use.
type VM struct {
	ID  string
	Net *netns.Net
	// Opened: the namespace existed and was adopted (Config.Adopt, Open).
	Opened bool
	// Pooled: the network was made around a clone process of the driver's
	// pool (Config.Template).
	Pooled bool

	cfg Config

	mu     sync.Mutex
	dns    *dnsfwd.Forwarder
	svc    []io.Closer // by Config.Services index; nil = not running
	ownsVM bool
	closed bool
	// steps undo, in reverse order, what made the VM; built once, in the
	// order of creation, each undoing whatever of its part is there when
	// Close runs, so parts (re)started later keep their place.
	steps []step
}

type step struct {
	name string
	undo func(ctx context.Context) error
}

// New makes the network (adopting an existing namespace with
// Config.Adopt), then the DNS forwarder with egress, then the services.
// On error nothing is left, an adopted namespace included.
func New(ctx context.Context, cfg Config) (*VM, error) {
	v := newVM(cfg)
	spare, release := v.reserve()
	nc := cfg.Net
	nc.ID = cfg.ID
	if spare != nil {
		nc.Spare = spare
	}
	n, err := netns.Setup(ctx, nc)
	if errors.Is(err, netns.ErrExists) && cfg.Adopt {
		n, err = netns.Open(ctx, cfg.ID)
		v.Opened = err == nil
	} else if err == nil && spare != nil {
		v.Pooled = true
	}
	if release != nil && (!v.Pooled || err != nil) {
		release()
	}
	if err != nil {
		return nil, fmt.Errorf("setting up the network of vm %s: %w", cfg.ID, err)
	}
	v.Net = n
	if err := v.Ensure(ctx); err != nil {
		if release != nil && v.Pooled {
			release()
		}
		v.Close()
		return nil, err
	}
	return v, nil
}

// Open adopts the existing network of VM cfg.ID (after a restart of kiln)
// without starting the forwarder or the services: Ensure does. It fails
// with netns.ErrNotFound when there is no such network.
func Open(ctx context.Context, cfg Config) (*VM, error) {
	n, err := netns.Open(ctx, cfg.ID)
	if err != nil {
		return nil, err
	}
	v := newVM(cfg)
	v.Net, v.Opened = n, true
	return v, nil
}

func newVM(cfg Config) *VM {
	v := &VM{ID: cfg.ID, cfg: cfg, svc: make([]io.Closer, len(cfg.Services))}
	v.steps = append(v.steps, step{StepNetwork, func(ctx context.Context) error {
		err := netns.Teardown(ctx, v.ID)
		if errors.Is(err, netns.ErrNotFound) {
			return nil
		}
		return err
	}})
	if cfg.Net.Egress {
		v.steps = append(v.steps, step{StepDNS, func(context.Context) error { return v.stopDNS() }})
	}
	for i, s := range cfg.Services {
		v.steps = append(v.steps, step{s.Name, func(context.Context) error { return v.stopService(i) }})
	}
	v.steps = append(v.steps, step{StepVM, func(ctx context.Context) error {
		v.mu.Lock()
		own := v.ownsVM
		v.ownsVM = false
		v.mu.Unlock()
		if !own || v.cfg.Driver == nil {
			return nil
		}
		return v.cfg.Driver.Terminate(ctx, v.ID)
	}})
	return v
}

// reserve sets a pooled clone process aside (Config.Template); release
// drops the reservation.
func (v *VM) reserve() (*os.File, func()) {
	r, ok := v.cfg.Driver.(vmm.PoolReserver)
	if !ok || v.cfg.Template == "" || v.cfg.Net.Spare != nil {
		return nil, nil
	}
	ns, ok := r.ReservePooled(v.cfg.Template, v.ID, netns.GuestMAC.String())
	if !ok {
		return nil, nil
	}
	return ns, func() { r.ReleasePooled(v.ID) }
}

// Ensure starts the DNS forwarder (with egress) and the services that are
// not running: after New, those whose Start returned nothing; after Open
// or Detach, all of them. On error what was running stays; Close removes
// everything.
func (v *VM) Ensure(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return fmt.Errorf("vm %s is closed: %w", v.ID, ErrClosed)
	}
	if v.cfg.Net.Egress && v.dns == nil {
		f, err := dnsfwd.Start(ctx, dnsfwd.Config{ID: v.ID, NSPath: v.Net.NSPath, Upstreams: v.cfg.Upstreams, OnAnswer: v.cfg.OnAnswer})
		if err != nil {
			return fmt.Errorf("starting the dns forwarder of vm %s: %w", v.ID, err)
		}
		v.dns = f
	}
	for i, s := range v.cfg.Services {
		if v.svc[i] != nil {
			continue
		}
		c, err := s.Start(ctx, v.Net)
		if err != nil {
			return fmt.Errorf("starting the %s of vm %s: %w", s.Name, v.ID, err)
		}
		v.svc[i] = c
	}
	return nil
}

// HasDNS reports whether the DNS forwarder runs.
func (v *VM) HasDNS() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.dns != nil
}

func (v *VM) stopDNS() error {
	v.mu.Lock()
	f := v.dns
	v.dns = nil
	v.mu.Unlock()
	if f == nil {
		return nil
	}
	return f.Close()
}

func (v *VM) stopService(i int) error {
	v.mu.Lock()
	c := v.svc[i]
	v.svc[i] = nil
	v.mu.Unlock()
	if c == nil {
		return nil
	}
	return c.Close()
}

// Detach stops what lives in this process (the services and the DNS
// forwarder, so that the next process can listen in their place) and
// leaves the VM and its network running, for a restarted kiln to adopt.
// Ensure starts them again.
func (v *VM) Detach() error {
	var errs []error
	for i := len(v.cfg.Services) - 1; i >= 0; i-- {
		if err := v.stopService(i); err != nil {
			errs = append(errs, &StepError{v.ID, v.cfg.Services[i].Name, err})
		}
	}
	if err := v.stopDNS(); err != nil {
		errs = append(errs, &StepError{v.ID, StepDNS, err})
	}
	return errors.Join(errs...)
}

// AdoptVM makes the driver's VM of this id (running, suspended or not
// there at all) the VM's own: Close terminates it.
func (v *VM) AdoptVM() { _ = v.own() }

// VMEnded says the VM ended by other means (vmm.Driver.Snapshot ends it):
// Close no longer terminates it.
func (v *VM) VMEnded() {
	v.mu.Lock()
	v.ownsVM = false
	v.mu.Unlock()
}

// own is AdoptVM that refuses once Close ran: a VM made then would have
// no step left to terminate it.
func (v *VM) own() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return fmt.Errorf("vm %s is closed: %w", v.ID, ErrClosed)
	}
	v.ownsVM = true
	return nil
}

// Boot boots the VM on this network (spec.ID and spec.Net are set). The
// VM is owned from the call on, as a boot that fails half-way may leave a
// process. On error the caller decides: Close removes everything.
func (v *VM) Boot(ctx context.Context, spec vmm.BootSpec) (vmm.Info, error) {
	spec.ID, spec.Net = v.ID, v.Net.Attachment()
	if err := v.own(); err != nil {
		return vmm.Info{}, err
	}
	info, err := v.cfg.Driver.Boot(ctx, spec)
	if err != nil {
		return info, fmt.Errorf("booting the vm: %w", err)
	}
	return info, nil
}

// Clone restores spec.Template as the VM on this network (spec.ID and
// spec.Net are set); see Boot.
func (v *VM) Clone(ctx context.Context, spec vmm.CloneSpec) (vmm.Info, error) {
	spec.ID, spec.Net = v.ID, v.Net.Attachment()
	if err := v.own(); err != nil {
		return vmm.Info{}, err
	}
	info, err := v.cfg.Driver.Clone(ctx, spec)
	if err != nil {
		return info, fmt.Errorf("restoring the snapshot: %w", err)
	}
	return info, nil
}

// Boot makes the network and boots the VM on it; on error nothing is left.
func Boot(ctx context.Context, cfg Config, spec vmm.BootSpec) (*VM, error) {
	return create(ctx, cfg, func(v *VM) error {
		_, err := v.Boot(ctx, spec)
		return err
	})
}

// Clone makes the network and restores a snapshot as the VM on it; on
// error nothing is left.
func Clone(ctx context.Context, cfg Config, spec vmm.CloneSpec) (*VM, error) {
	if cfg.Template == "" {
		cfg.Template = spec.Template
	}
	return create(ctx, cfg, func(v *VM) error {
		_, err := v.Clone(ctx, spec)
		return err
	})
}

func create(ctx context.Context, cfg Config, start func(*VM) error) (*VM, error) {
	v, err := New(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := start(v); err != nil {
		v.Close()
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		return nil, err
	}
	return v, nil
}

// Close undoes every step in the reverse order of creation: the VM is
// terminated, the services and the forwarder stop, the network goes. Every
// step runs even if an earlier one failed; the failures are joined, each
// a *StepError. Closing again does nothing.
func (v *VM) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), CloseTimeout)
	defer cancel()
	v.mu.Lock()
	steps := v.steps
	v.steps, v.closed = nil, true
	v.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].undo(ctx); err != nil {
			errs = append(errs, &StepError{v.ID, steps[i].name, err})
		}
	}
	return errors.Join(errs...)
}

// Remove terminates the driver's VM id (d may be nil) and removes its
// network, as Close would, for a VM of which no *VM is at hand (a
// leftover, or one whose adoption failed).
func Remove(ctx context.Context, d vmm.Driver, id string) error {
	var errs []error
	if d != nil {
		if err := d.Terminate(ctx, id); err != nil {
			errs = append(errs, &StepError{id, StepVM, err})
		}
	}
	if err := netns.Teardown(ctx, id); err != nil && !errors.Is(err, netns.ErrNotFound) {
		errs = append(errs, &StepError{id, StepNetwork, err})
	}
	return errors.Join(errs...)
}
