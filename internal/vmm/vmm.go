// Package vmm defines kiln's VM engine: the Driver contract every
// hypervisor back end (QEMU now, Firecracker later) satisfies, and the
// types that cross it. Implementations live in subpackages.
package vmm

import (
	"context"
	"os"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
)

// State is where a VM is in its life, as the driver sees it.
type State string

const (
	// StateRunning: a QEMU process runs the guest and its agent answers.
	StateRunning State = "running"
	// StateSuspended: memory and device state are on disk, no process runs.
	StateSuspended State = "suspended"
	// StateStopped: the guest shut down or its process died; only files remain.
	StateStopped State = "stopped"
)

// Accel is the accelerator QEMU uses.
type Accel string

const (
	AccelKVM Accel = "kvm"
	AccelTCG Accel = "tcg"
)

// NetAttachment connects a VM to a network prepared by internal/netns:
// QEMU is started inside Netns and opens Tap there.
type NetAttachment struct {
	Netns string // path of the network namespace (e.g. /run/netns/kiln-ID)
	Tap   string // TAP device inside Netns
	MAC   string // guest MAC; the same for all clones of a snapshot is fine
}

// BootSpec describes a VM to cold-boot.
type BootSpec struct {
	ID        string // unique; lowercase letters, digits and '-'
	MemoryMiB int    // guest memory; 512 if zero
	VCPUs     int    // 1 if zero
	// RootDisk is an ext4 image used as the read-only base of the VM's own
	// qcow2 overlay; the driver never writes to it.
	RootDisk string
	Net      *NetAttachment // nil: no NIC
	Hostname string         // "" means the ID
	// ScratchDisk says the VM's disk writes are worthless after a host
	// crash (a build step, redone from its inputs): the driver may then
	// ignore the guest's flushes, which package managers issue per file.
	ScratchDisk bool
	// Disks are extra raw disks (a build step's RUN --mount), after the
	// root disk, in order. A VM with extra disks cannot be snapshotted,
	// unless DeferRoot.
	Disks []Disk
	// DeferRoot boots the guest to its initramfs only: the agent answers,
	// but no disk is probed or read until a clone's driver finishes the
	// boot on disks of the clone's own (CloneSpec.RootDisk). Such a VM is
	// made to be snapshotted: a warm start for VMs that each need their
	// own root (build steps). Its RootDisk and Disks are placeholders of
	// the shape the clones will have.
	DeferRoot bool
}

// Disk is an extra raw disk image of a booted VM. The driver opens it
// as raw, whatever its content, and writes to it only if not ReadOnly.
type Disk struct {
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// Serial names the disk to the guest (the agent finds it by this):
	// 1-20 characters of a-z, 0-9 and '-'.
	Serial string `json:"serial"`
}

// CloneSpec describes a VM to start from a template.
type CloneSpec struct {
	ID       string
	Template string // template directory made by Snapshot
	Net      *NetAttachment
	Hostname string // "" means the ID
	// RootDisk, if set, starts the clone on disks of its own instead of
	// the template's: the template must come from a DeferRoot VM with as
	// many Disks, and the clone is then what Boot of RootDisk, Disks and
	// ScratchDisk would give (see BootSpec), only without the kernel's
	// boot. ErrInvalid for any other template.
	RootDisk    string
	Disks       []Disk
	ScratchDisk bool
}

// Info is what the driver knows about one VM.
type Info struct {
	ID        string    `json:"id"`
	State     State     `json:"state"`
	Dir       string    `json:"dir"`
	PID       int       `json:"pid,omitempty"`
	MemoryMiB int       `json:"memory_mib"`
	Template  string    `json:"template,omitempty"` // set for clones
	StartedAt time.Time `json:"started_at"`
	// Reason says why the VM is stopped, when it is.
	Reason string `json:"reason,omitempty"`
}

// Platform is what a snapshot depends on: restoring on another platform
// is refused, since QEMU would crash or corrupt the guest.
type Platform struct {
	QEMUVersion string `json:"qemu_version"`
	Machine     string `json:"machine"`
	Accel       Accel  `json:"accel"`
	CPU         string `json:"cpu"`
	// CPUFeatures fingerprints the host CPU when the guest sees it as it
	// is (KVM's "host" model): a snapshot taken where a feature exists
	// crashes the guest where it does not. Empty for a named model whose
	// features QEMU defines (TCG's "max": the QEMU version fixes them).
	CPUFeatures string `json:"cpu_features,omitempty"`
}

// Template is a snapshot of a VM: memory file, device state and disk.
type Template struct {
	Dir       string    `json:"dir"`
	Platform  Platform  `json:"platform"`
	MemoryMiB int       `json:"memory_mib"`
	VCPUs     int       `json:"vcpus"`
	HasNet    bool      `json:"has_net"`
	CreatedAt time.Time `json:"created_at"`
	// DeferredRoot: made from a DeferRoot VM with ExtraDisks extra disks;
	// only clones with their own disks (CloneSpec.RootDisk) may use it.
	DeferredRoot bool `json:"deferred_root,omitempty"`
	ExtraDisks   int  `json:"extra_disks,omitempty"`
}

// Usage is what a running VM uses, measured on the host at At.
type Usage struct {
	At time.Time
	// CPUTime is the CPU time (user and system) its process has used
	// since it started: the guest's vCPUs and the emulation around them.
	CPUTime time.Duration
	// ResidentBytes is its process's resident memory: the guest pages it
	// touched (shared template pages included) and the VMM's own.
	ResidentBytes int64
	// MemorySize is the guest's memory size.
	MemorySize int64
	// DiskAllocated is what the VM's own disk layer holds on the host:
	// what it wrote over its template. DiskSize is the disk's size as the
	// guest sees it.
	DiskAllocated, DiskSize int64
}

// UsageReporter is implemented by drivers that can measure a running VM.
type UsageReporter interface {
	// Usage measures a running VM; ErrNotFound for an unknown one,
	// ErrConflict for one not running. It has no side effects.
	Usage(ctx context.Context, id string) (Usage, error)
}

// PoolReserver is implemented by drivers that start clone processes ahead,
// each waiting in a network namespace of its own (made by netns.NewSpare).
// The caller reserves one for a VM before making the VM's network, passes
// the namespace to netns.Setup (Config.Spare) so that the network is made
// around the waiting process's TAP, and then calls Clone for that VM,
// which takes the reserved process; nothing is moved between namespaces.
type PoolReserver interface {
	// ReservePooled sets a process started ahead for template (a clone
	// with NIC mac) aside for VM id and returns its network namespace,
	// owned by the driver (do not close it); ok is false when none is
	// ready or the template has no NIC. A reservation that no Clone takes
	// is dropped after a while.
	ReservePooled(template, id, mac string) (ns *os.File, ok bool)
	// ReleasePooled drops VM id's reservation (a failed network set-up);
	// the namespace, if Setup named it, stays the VM's and works without
	// the process. Terminate also drops it.
	ReleasePooled(id string)
}

// TemplateCopy asks for a copy of a template whose disk stands on another
// root disk of the same content (the image builder's template cache keeps
// one per key and hands out copies backed by each version's own root).
type TemplateCopy struct {
	Src string // template directory made by Snapshot or CopyTemplate
	// SrcRoot is the root disk Src's disk stands on: the BootSpec.RootDisk
	// of the VM it was snapshotted from, or the Root of its copy. Src is
	// refused if its disk names another file.
	SrcRoot string
	Dst     string // the copy's directory; must not exist
	// Root is the root disk the copy's disk stands on: same content as
	// SrcRoot, need not exist yet (a path the caller will rename into).
	Root string
	// NoClone: the copy is only ever copied from again, never cloned
	// directly (a cache entry), so it needs nothing that names its Dst.
	NoClone bool
}

// Event reports something that happened to a VM without being asked,
// such as its process dying.
type Event struct {
	ID     string
	State  State
	Reason string
	Time   time.Time
}

// RecoveryReport says what Recover found after a restart.
type RecoveryReport struct {
	Adopted   []string // VMs whose processes still run, now managed again
	Suspended []string // suspended VMs whose files are intact
	Removed   []string // leftovers that were cleaned up, with why
}

// Driver runs VMs. All methods are safe for concurrent use; operations on
// one VM are serialized. ctx bounds the call, never the VM: a VM started
// by a call outlives the call's context. Errors wrap the categories of
// internal/errdefs.
type Driver interface {
	// Boot cold-boots a VM and returns once its agent answers. A VM with
	// the same ID that already exists is ErrConflict. On failure nothing
	// is left behind.
	Boot(ctx context.Context, spec BootSpec) (Info, error)

	// Snapshot freezes the VM's workloads, saves its memory, device state
	// and disk into a new template directory dir (which must not exist),
	// and ends the VM: its memory file becomes the template's. The VM is
	// gone afterwards (as after Terminate), whether or not Snapshot
	// succeeded; a partial template is removed.
	Snapshot(ctx context.Context, id, dir string) (Template, error)

	// Clone starts a VM from a template: memory is a private copy-on-write
	// mapping of the template's file and the disk a qcow2 overlay on the
	// template's disk, so nothing is copied. It returns once the agent has
	// refreshed the guest's identity (entropy, clock, hostname) and thawed
	// its workloads. A template from another platform is ErrInvalid.
	Clone(ctx context.Context, spec CloneSpec) (Info, error)

	// CommitDisk writes what a stopped, booted VM wrote to its disk back
	// into its BootSpec.RootDisk (an image build step's changes). The VM
	// must be stopped (Stop), else ErrConflict; a clone has no root disk
	// of its own (ErrInvalid). The disk chain is checked first, since the
	// guest's VMM wrote the overlay: one that names another file than the
	// root disk is refused (ErrInvalid) and nothing is written. The VM
	// keeps its files until Terminate; committing twice writes the same
	// blocks again.
	CommitDisk(ctx context.Context, id string) error

	// CopyTemplate makes a template equal to spec.Src whose disk stands on
	// spec.Root, sharing big files with Src where it can, and returns it
	// (Dir = spec.Dst). Src's disk chain is checked to be exactly its disk
	// on spec.SrcRoot (ErrInvalid otherwise, nothing made). On failure the
	// partial copy is removed.
	CopyTemplate(ctx context.Context, spec TemplateCopy) (Template, error)

	// Suspend saves a running VM's full memory and device state into its
	// directory and ends its process, freeing host memory. Suspending a
	// suspended VM is a no-op; a stopped one is ErrConflict.
	Suspend(ctx context.Context, id string) error

	// Resume restarts a suspended VM exactly where it was, then refreshes
	// its identity like Clone. Resuming a running VM is a no-op.
	Resume(ctx context.Context, id string) (Info, error)

	// Stop asks the guest to shut down cleanly (bounded by ctx, then
	// killed). Its files stay until Terminate. Stopping a stopped VM is a
	// no-op.
	Stop(ctx context.Context, id string) error

	// Terminate kills the VM if it runs and removes everything it owns.
	// Idempotent: terminating an unknown VM is not an error.
	Terminate(ctx context.Context, id string) error

	// Inspect returns one VM's info, ErrNotFound if unknown.
	Inspect(ctx context.Context, id string) (Info, error)

	// List returns every VM the driver manages.
	List(ctx context.Context) ([]Info, error)

	// Agent returns the connected agent client of a running VM; a VM
	// that is not running (suspended, stopped) is ErrConflict.
	Agent(ctx context.Context, id string) (*client.Client, error)

	// Recover reconciles what a previous kiln process left on this host
	// (processes, sockets, directories) with what can be managed: running
	// VMs are adopted, suspended ones kept, the rest removed. Call once at
	// start-up, before any other method.
	Recover(ctx context.Context) (RecoveryReport, error)

	// Events delivers unrequested state changes (a VM process that died).
	// The channel is buffered; a slow reader loses the oldest events.
	Events() <-chan Event

	// Close releases the driver's own resources. Running VMs keep running
	// and can be adopted by the next Recover.
	Close() error
}

// Forker is implemented by drivers that can copy a suspended VM into a
// template while the VM stays suspended (E2B's snapshots and forks).
type Forker interface {
	// TemplateFromSuspended makes a template in dir (which must not
	// exist) of a suspended VM's memory, device state and disk. The VM
	// stays suspended and may resume; clones of the template start where
	// it was suspended. The template owns every file its disk chain
	// names (links or copies), so it outlives the VM and the template
	// the VM was cloned from. A VM that is not suspended is ErrConflict;
	// on failure the partial template is removed.
	TemplateFromSuspended(ctx context.Context, id, dir string) (Template, error)
}
