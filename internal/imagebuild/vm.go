//go:build linux

package imagebuild

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/dnsfwd"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// CleanupTimeout bounds tearing down one VM and its network. Cleanup runs
// under context.WithoutCancel: a cancelled build must still leave nothing.
const CleanupTimeout = 60 * time.Second

// VM id prefixes: RUN steps, image VMs (snapshotted) and bench VMs.
const (
	PrefixBuild = "build"
	PrefixImage = "image"
	PrefixBench = "bench"
	// PrefixValidate: a clone of the new template that the validate hook
	// runs on.
	PrefixValidate = "validate"
)

// IsBuildVM reports whether id names a VM (and network) that this package
// made. Such VMs live only while a build runs: after a crash of kiln,
// Recover may find them; terminate them and tear down their networks.
func IsBuildVM(id string) bool {
	for _, p := range []string{PrefixBuild, PrefixImage, PrefixBench, PrefixValidate} {
		if strings.HasPrefix(id, p+"-") {
			return true
		}
	}
	return false
}

// NewID returns "prefix-" and 12 random hex digits: a valid VM and netns id.
func NewID(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	id := prefix + "-" + hex.EncodeToString(b)
	if testHookNewVM != nil {
		testHookNewVM(id)
	}
	return id
}

// guestVM is a VM booted for a build (a RUN step, or the image VM that is
// snapshotted), with its own network namespace and, with egress, a DNS
// forwarder and the package proxy's listener at the guest's gateway.
type guestVM struct {
	id     string
	driver vmm.Driver
	net    *netns.Net
	dns    *dnsfwd.Forwarder
	pkg    *pkgproxy.Listener
	info   vmm.Info
	booted bool
	log    *slog.Logger
}

type vmSpec struct {
	prefix    string
	rootDisk  string
	memoryMiB int
	vcpus     int
	egress    bool
	upstreams []string
	extraDeny []netip.Prefix
	scratch   bool // a RUN step's VM: see vmm.BootSpec.ScratchDisk
	disks     []vmm.Disk
	// packages, with egress and an account, redirects the guest's plain
	// HTTP to the operator's Debian mirrors to the package proxy, which
	// serves it from (and fills) that account's cache.
	packages *pkgproxy.Proxy
	account  string
	// deferRoot boots a warm template's VM (see warm.go).
	deferRoot bool
}

// testHookNewVM, if set (tests only), learns the id of every VM and
// network a build creates, so tests can check that all are gone.
var testHookNewVM func(id string)

// newGuestNet names a new VM and sets up its network (and DNS forwarder
// when it has egress), as bootVM and cloneVM both need. On error nothing
// is left.
func newGuestNet(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec) (*guestVM, error) {
	g := &guestVM{id: NewID(s.prefix), driver: d, log: log}
	g.log = log.With("vm", g.id)
	cfg := netns.Config{ID: g.id, Egress: s.egress, ExtraDeny: s.extraDeny}
	if s.egress && s.packages != nil && s.account != "" {
		// Resolved afresh for each VM: the guest resolves the same names
		// through its DNS forwarder moments later.
		addrs, err := s.packages.Resolve(ctx)
		if err != nil {
			g.log.Warn("package proxy off for this vm: the Debian mirrors do not resolve", "err", err)
		} else {
			cfg.PackageProxy = &netns.Redirect{Addrs: addrs, Port: pkgproxy.DefaultPort}
		}
	}
	var err error
	if g.net, err = netns.Setup(ctx, cfg); err != nil {
		return nil, fmt.Errorf("setting up the vm network: %w", err)
	}
	if s.egress {
		if g.dns, err = dnsfwd.Start(ctx, dnsfwd.Config{ID: g.id, NSPath: g.net.NSPath, Upstreams: s.upstreams}); err != nil {
			g.close()
			return nil, fmt.Errorf("starting the dns forwarder: %w", err)
		}
	}
	if cfg.PackageProxy != nil {
		g.pkg, err = s.packages.Serve(ctx, pkgproxy.ServeConfig{ID: g.id, NSPath: g.net.NSPath, Scope: image.ScopeName(s.account)})
		if err != nil {
			g.close()
			return nil, fmt.Errorf("starting the package proxy: %w", err)
		}
	}
	return g, nil
}

// bootVM sets up the network and boots. On error nothing is left.
func bootVM(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec) (*guestVM, error) {
	g, err := newGuestNet(ctx, d, log, s)
	if err != nil {
		return nil, err
	}
	g.booted = true // from here on Terminate is needed even if Boot fails half-way
	g.info, err = d.Boot(ctx, vmm.BootSpec{
		ID: g.id, MemoryMiB: s.memoryMiB, VCPUs: s.vcpus, RootDisk: s.rootDisk, ScratchDisk: s.scratch, Disks: s.disks,
		Net: g.net.Attachment(), DeferRoot: s.deferRoot,
	})
	if err != nil {
		g.close()
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		return nil, fmt.Errorf("booting the build vm: %w", err)
	}
	return g, nil
}

// cloneVM sets up a network and restores the template in tmplDir, as
// the engine runs a microVM; with a rootDisk, on the spec's own disks (a
// warm template's clone). On error nothing is left.
func cloneVM(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec, tmplDir string) (*guestVM, error) {
	g, err := newGuestNet(ctx, d, log, s)
	if err != nil {
		return nil, err
	}
	g.booted = true
	cs := vmm.CloneSpec{ID: g.id, Template: tmplDir, Net: g.net.Attachment()}
	if s.rootDisk != "" {
		cs.RootDisk, cs.Disks, cs.ScratchDisk = s.rootDisk, s.disks, s.scratch
	}
	g.info, err = d.Clone(ctx, cs)
	if err != nil {
		g.close()
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		return nil, fmt.Errorf("restoring the snapshot: %w", err)
	}
	return g, nil
}

// close terminates the VM (if any) and removes its network. Idempotent.
func (g *guestVM) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), CleanupTimeout)
	defer cancel()
	var errs []error
	if g.booted {
		if err := g.driver.Terminate(ctx, g.id); err != nil {
			errs = append(errs, fmt.Errorf("terminating vm %s: %w", g.id, err))
		}
		g.booted = false
	}
	if g.dns != nil {
		_ = g.dns.Close()
		g.dns = nil
	}
	if g.pkg != nil {
		_ = g.pkg.Close()
		g.pkg = nil
	}
	if g.net != nil {
		if err := g.net.Teardown(ctx); err != nil && !errors.Is(err, netns.ErrNotFound) {
			errs = append(errs, fmt.Errorf("removing network of %s: %w", g.id, err))
		}
		g.net = nil
	}
	err := errors.Join(errs...)
	if err != nil {
		g.log.Warn("build vm cleanup", "err", err)
	}
	return err
}
