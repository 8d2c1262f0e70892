//go:build linux

// Package qemu implements vmm.Driver with one QEMU process per VM, QMP over
// a unix socket, and the snapshot recipe measured on these hosts: memory in
// a file, device state saved with x-ignore-shared, clones mapping the
// template's memory privately (copy-on-write) and the disk as a qcow2
// overlay.
package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/hosttool"
	"github.com/kiln-sandbox/kiln/internal/initramfs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

var _ vmm.Driver = (*Driver)(nil)

// Config configures the driver.
type Config struct {
	DataDir     string // VMs live in DataDir/vms/ID
	Accel       string // auto, kvm or tcg
	QEMU        string // qemu-system-x86_64 unless set
	QEMUImg     string // qemu-img unless set
	KernelDir   string // DataDir/kernel unless set (made by the set-up step)
	AgentBinary string // the static kiln-agent put into the initramfs
	// BootTimeout bounds a cold boot until the agent answers: 60 s under
	// KVM, 3 minutes under TCG unless set, since a translated boot on a
	// busy host (several builds at once) can take a minute on its own.
	// A boot with no answer by half of it is booted once more with the
	// whole of it, so a guest that never answers fails after 1.5 times it.
	BootTimeout time.Duration
	// BootIDPath is where the host's boot id is read (default
	// /proc/sys/kernel/random/boot_id); tests point it at a file to
	// simulate a host reboot.
	BootIDPath string
	// Console, if set, returns where the serial console of VM id goes
	// besides the in-memory ring of its last 64 KiB (the engine's
	// durable log). Its writers must not block.
	Console func(id string) io.Writer
	// PoolSize is how many QEMU processes per template are started ahead
	// of clones (pool.go); 0 starts none.
	PoolSize int
	// PoolIdle drains the pool of a template not cloned for this long
	// (default 10 minutes).
	PoolIdle time.Duration
	// UIDBase is the first uid of the range VM processes get theirs from
	// (default DefaultUIDBase; UIDRange uids). Two drivers on one host (a
	// cluster's nodes standing in for hosts) give each its own range.
	UIDBase uint32
	Log     *slog.Logger
}

// Driver is the QEMU implementation of vmm.Driver.
type Driver struct {
	cfg      Config
	log      *slog.Logger
	platform vmm.Platform
	initrd   string // built once per agent binary and module set

	mu       sync.Mutex
	vms      map[string]*vm
	poolUIDs map[uint32]bool // uids of pooled processes (pool.go)
	pool     *pool           // the clone pool (pool.go)

	events chan vmm.Event
	closed chan struct{}
}

var idRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// New checks the host, chooses the accelerator and prepares the initramfs.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("qemu driver: data dir not set: %w", errdefs.ErrInvalid)
	}
	if b := uint64(cfg.UIDBase); cfg.UIDBase != 0 && (b < 1<<16 || b+UIDRange > 1<<32-1 ||
		(uint64(hosttool.ID) >= b && uint64(hosttool.ID) < b+UIDRange)) {
		return nil, fmt.Errorf("qemu driver: vm uid base %#x: want a range of %d uids above 65535 that leaves out the host tools' id %#x: %w",
			cfg.UIDBase, UIDRange, hosttool.ID, errdefs.ErrInvalid)
	}
	if cfg.QEMU == "" {
		cfg.QEMU = "qemu-system-x86_64"
	}
	if cfg.QEMUImg == "" {
		cfg.QEMUImg = "qemu-img"
	}
	if cfg.KernelDir == "" {
		cfg.KernelDir = filepath.Join(cfg.DataDir, "kernel")
	}
	if cfg.AgentBinary == "" {
		cfg.AgentBinary = DefaultAgentBinary(cfg.DataDir)
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if err := checkPrerequisites(&cfg); err != nil {
		return nil, err
	}
	accel, why, err := chooseAccel(cfg.Accel)
	if err != nil {
		return nil, err
	}
	ver, err := qemuVersion(ctx, cfg.QEMU)
	if err != nil {
		return nil, err
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 60 * time.Second
		if accel == vmm.AccelTCG {
			cfg.BootTimeout = 3 * time.Minute
		}
	}
	machine, cpu := machineFor(accel)
	var features string
	if accel == vmm.AccelKVM {
		if features, err = hostCPUFeatures(); err != nil {
			return nil, err
		}
	}
	d := &Driver{
		cfg:      cfg,
		log:      cfg.Log,
		platform: vmm.Platform{QEMUVersion: ver, Machine: machine, Accel: accel, CPU: cpu, CPUFeatures: features},
		vms:      map[string]*vm{},
		poolUIDs: map[uint32]bool{},
		events:   make(chan vmm.Event, 256),
		closed:   make(chan struct{}),
	}
	d.log.Info("vm engine ready", "accel", accel, "why", why, "machine", machine, "qemu", ver)
	if accel == vmm.AccelTCG {
		warnTCG(d.log)
	}
	for _, dir := range []string{d.vmsDir(), d.runDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("creating %s: %w", dir, err)
		}
	}
	if d.initrd, err = d.buildInitrd(); err != nil {
		return nil, err
	}
	// Always there (SetPoolSize may turn it on later); size 0 starts nothing.
	d.pool = newPool(d, max(cfg.PoolSize, 0), cfg.PoolIdle)
	return d, nil
}

// DefaultAgentBinary is where kiln looks for kiln-agent: next to the kiln
// executable, else in DATA_DIR/bin.
func DefaultAgentBinary(dataDir string) string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "kiln-agent")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return filepath.Join(dataDir, "bin", "kiln-agent")
}

// GuestBuild names the guest side this driver boots (agent and modules,
// by content hash): a snapshot made with another build holds another
// agent, so caches of snapshots key on it.
func (d *Driver) GuestBuild() string { return filepath.Base(d.initrd) }

// Platform reports what snapshots made by this driver depend on.
func (d *Driver) Platform() vmm.Platform { return d.platform }

func (d *Driver) vmsDir() string { return filepath.Join(d.cfg.DataDir, "vms") }
func (d *Driver) runDir() string { return filepath.Join(d.cfg.DataDir, "run") }

// buildInitrd writes the initramfs once per content: its name is a hash
// of the agent and the modules, so templates keep pointing at the exact
// file they booted with.
func (d *Driver) buildInitrd() (string, error) {
	mods, err := d.cfg.modules()
	if err != nil {
		return "", fmt.Errorf("reading module list: %w", err)
	}
	h := sha256.New()
	files := []string{d.cfg.AgentBinary}
	for _, m := range mods {
		files = append(files, filepath.Join(d.cfg.KernelDir, "modules", m))
	}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return "", fmt.Errorf("hashing %s: %w", f, err)
		}
		io.WriteString(h, filepath.Base(f))
		_, err = io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return "", fmt.Errorf("hashing %s: %w", f, err)
		}
	}
	path := filepath.Join(d.runDir(), "initrd-"+hex.EncodeToString(h.Sum(nil))[:16]+".img")
	// Readable to all (it holds only the agent and kernel modules): each
	// QEMU reads it under its own uid, through a bind into its jail.
	if err := os.Chmod(path, 0o644); err == nil {
		return path, nil
	}
	tmp, err := os.CreateTemp(d.runDir(), "initrd-*.tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	// Uncompressed: the guest unpacks it in 0.2 s instead of 0.6 s for gzip.
	if err := initramfs.BuildUncompressed(tmp, d.cfg.AgentBinary, filepath.Join(d.cfg.KernelDir, "modules"), mods); err != nil {
		tmp.Close()
		return "", fmt.Errorf("building initramfs: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", err
	}
	return path, nil
}

func (d *Driver) get(id string) (*vm, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[id]
	if !ok {
		return nil, fmt.Errorf("vm %s: %w", id, errdefs.ErrNotFound)
	}
	return v, nil
}

// reserve registers a new VM id, refusing duplicates and bad ids.
func (d *Driver) reserve(id string) (*vm, error) {
	if !idRe.MatchString(id) {
		return nil, fmt.Errorf("vm id %q: use 1-63 lowercase letters, digits or '-': %w", id, errdefs.ErrInvalid)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.vms[id]; ok {
		return nil, fmt.Errorf("vm %s already exists: %w", id, errdefs.ErrConflict)
	}
	if _, err := os.Stat(filepath.Join(d.vmsDir(), id)); err == nil {
		return nil, fmt.Errorf("vm %s: its directory already exists: %w", id, errdefs.ErrConflict)
	}
	v := &vm{d: d, id: id, dir: filepath.Join(d.vmsDir(), id), log: d.log.With("microvm", id), uid: d.pickUID()}
	v.op.Lock() // released by the creating operation
	d.vms[id] = v
	return v, nil
}

// QEMU runs unprivileged from its first instruction (its jail drops root
// before the exec, see jail.go): each VM of this driver gets its own uid
// from this range, so a QEMU the guest took over can neither touch the
// host as root nor signal, trace or read another VM's QEMU. It opens by
// path only what its jail holds; disks and state come as descriptors.
// Two drivers on one host (two data dirs) pick uids independently and
// may, rarely, share one (their jails and cgroups still differ).
const (
	DefaultUIDBase = 0x6b690000
	UIDRange       = 1 << 16
)

// pickUID returns a uid no other VM of this driver has, or 0 (QEMU keeps
// kiln's identity) when kiln is not root. Called with d.mu held.
func (d *Driver) pickUID() uint32 {
	if os.Geteuid() != 0 {
		return 0
	}
	used := make(map[uint32]bool, len(d.vms)+len(d.poolUIDs))
	for u := range d.poolUIDs {
		used[u] = true
	}
	for _, v := range d.vms {
		used[v.uid] = true
	}
	for {
		u := d.uidBase() + uint32(rand.IntN(UIDRange))
		if !used[u] {
			return u
		}
	}
}

func (d *Driver) uidBase() uint32 {
	if d.cfg.UIDBase != 0 {
		return d.cfg.UIDBase
	}
	return DefaultUIDBase
}

func (d *Driver) forget(id string) {
	d.mu.Lock()
	delete(d.vms, id)
	d.mu.Unlock()
}

func (d *Driver) emit(e vmm.Event) {
	for {
		select {
		case d.events <- e:
			return
		default:
		}
		select { // full: drop the oldest so the newest news gets through
		case <-d.events:
		default:
		}
	}
}

// Events implements vmm.Driver.
func (d *Driver) Events() <-chan vmm.Event { return d.events }

// Close implements vmm.Driver: VMs keep running for the next Recover;
// processes started ahead for clones are killed.
func (d *Driver) Close() error {
	if d.pool != nil {
		d.pool.close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.closed:
		return nil
	default:
	}
	close(d.closed)
	for _, v := range d.vms {
		v.detach()
	}
	return nil
}

// Inspect implements vmm.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (vmm.Info, error) {
	v, err := d.get(id)
	if err != nil {
		return vmm.Info{}, err
	}
	return v.info(), nil
}

// List implements vmm.Driver.
func (d *Driver) List(ctx context.Context) ([]vmm.Info, error) {
	d.mu.Lock()
	vs := make([]*vm, 0, len(d.vms))
	for _, v := range d.vms {
		vs = append(vs, v)
	}
	d.mu.Unlock()
	out := make([]vmm.Info, 0, len(vs))
	for _, v := range vs {
		out = append(out, v.info())
	}
	return out, nil
}

// Agent implements vmm.Driver.
func (d *Driver) Agent(ctx context.Context, id string) (*client.Client, error) {
	v, err := d.get(id)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.agent == nil || v.meta.State != vmm.StateRunning {
		return nil, fmt.Errorf("vm %s is %s: %w", id, v.meta.State, errdefs.ErrConflict)
	}
	return v.agent, nil
}

func errorsIsNotExist(err error) bool { return errors.Is(err, os.ErrNotExist) }

// CheckSuspended reports which of a suspended VM's saved files is
// missing (its memory, device state or disk), or nil if all are there.
func (d *Driver) CheckSuspended(ctx context.Context, id string) error {
	v, err := d.get(id)
	if err != nil {
		return err
	}
	for _, f := range []struct{ name, what string }{
		{"mem", "memory"}, {"state", "device state"}, {"disk.qcow2", "disk"},
	} {
		if _, err := os.Stat(v.path(f.name)); err != nil {
			return fmt.Errorf("its saved %s (%s) is gone: %w", f.what, f.name, errdefs.ErrNotFound)
		}
	}
	return nil
}
