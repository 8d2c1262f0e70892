//go:build linux

package imagebuild

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

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
	*guestvm.VM
	id  string
	log *slog.Logger
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

// guestConfig names a new VM and says what its network needs, as bootVM
// and cloneVM both do.
func guestConfig(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec) (guestvm.Config, *slog.Logger) {
	cfg := guestvm.Config{ID: NewID(s.prefix), Driver: d, Upstreams: s.upstreams,
		Net: netns.Config{Egress: s.egress, ExtraDeny: s.extraDeny}}
	log = log.With("vm", cfg.ID)
	if s.egress && s.packages != nil && s.account != "" {
		// Resolved afresh for each VM: the guest resolves the same names
		// through its DNS forwarder moments later.
		addrs, err := s.packages.Resolve(ctx)
		if err != nil {
			log.Warn("package proxy off for this vm: the Debian mirrors do not resolve", "err", err)
		} else {
			cfg.Net.PackageProxy = &netns.Redirect{Addrs: addrs, Port: pkgproxy.DefaultPort}
			cfg.Services = []guestvm.Service{{Name: "package proxy", Start: func(ctx context.Context, n *netns.Net) (io.Closer, error) {
				return s.packages.Serve(ctx, pkgproxy.ServeConfig{ID: n.ID, NSPath: n.NSPath, Scope: image.ScopeName(s.account)})
			}}}
		}
	}
	return cfg, log
}

// bootVM sets up the network and boots. On error nothing is left.
func bootVM(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec) (*guestVM, error) {
	cfg, log := guestConfig(ctx, d, log, s)
	v, err := guestvm.Boot(ctx, cfg, vmm.BootSpec{MemoryMiB: s.memoryMiB, VCPUs: s.vcpus, RootDisk: s.rootDisk,
		ScratchDisk: s.scratch, Disks: s.disks, DeferRoot: s.deferRoot})
	if err != nil {
		return nil, err
	}
	return &guestVM{VM: v, id: v.ID, log: log}, nil
}

// cloneVM sets up a network and restores the template in tmplDir, as
// the engine runs a microVM; with a rootDisk, on the spec's own disks (a
// warm template's clone). On error nothing is left.
func cloneVM(ctx context.Context, d vmm.Driver, log *slog.Logger, s vmSpec, tmplDir string) (*guestVM, error) {
	cfg, log := guestConfig(ctx, d, log, s)
	cs := vmm.CloneSpec{Template: tmplDir}
	if s.rootDisk != "" {
		cs.RootDisk, cs.Disks, cs.ScratchDisk = s.rootDisk, s.disks, s.scratch
	}
	v, err := guestvm.Clone(ctx, cfg, cs)
	if err != nil {
		return nil, err
	}
	return &guestVM{VM: v, id: v.ID, log: log}, nil
}

// close terminates the VM (if any) and removes its network. Idempotent.
// Only what may be left on the host fails it (the VM, the network): a
// listener of this process that reports an error on closing is closed
// all the same.
func (g *guestVM) close() error {
	err := g.Close()
	if err != nil {
		g.log.Warn("build vm cleanup", "err", err)
	}
	if guestvm.Failed(err, guestvm.StepVM) || guestvm.Failed(err, guestvm.StepNetwork) {
		return err
	}
	return nil
}
