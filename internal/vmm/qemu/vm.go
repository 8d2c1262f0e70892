//go:build linux

package qemu

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qmp"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Phases that a crash can interrupt; Recover decides from them.
const (
	phaseBooting    = "booting"
	phaseSuspending = "suspending"
	phaseResuming   = "resuming"
)

// meta is the VM's record on disk (vm.json), written atomically before
// and after every step so that a restarted kiln can reconcile.
type meta struct {
	ID        string       `json:"id"`
	State     vmm.State    `json:"state"`
	Phase     string       `json:"phase,omitempty"`
	MemoryMiB int          `json:"memory_mib"`
	VCPUs     int          `json:"vcpus"`
	Platform  vmm.Platform `json:"platform"`
	Kernel    string       `json:"kernel"`
	Initrd    string       `json:"initrd"`
	Template  string       `json:"template,omitempty"`
	// MemPrivate: memory is a private copy-on-write mapping of the
	// template's file, which must be written out before the process ends.
	MemPrivate bool               `json:"mem_private"`
	Net        *vmm.NetAttachment `json:"net,omitempty"`
	Hostname   string             `json:"hostname"`
	// ScratchDisk: guest flushes are not passed on (cache=unsafe).
	ScratchDisk bool `json:"scratch_disk,omitempty"`
	// Disks are extra raw disks (disks.go).
	Disks []vmm.Disk `json:"disks,omitempty"`
	// DeferRoot: booted with kiln.root=defer (vmm.BootSpec.DeferRoot).
	DeferRoot bool `json:"defer_root,omitempty"`
	// OwnDisk: a clone of a deferred-root template that runs on a root
	// disk of its own (Chain), not on its template's.
	OwnDisk bool `json:"own_disk,omitempty"`
	// UID is the unprivileged uid (and gid) QEMU runs as; 0: kiln's own.
	UID uint32 `json:"uid,omitempty"`
	// Jailed: QEMU runs in the VM's jail (jail.go); its sockets are in
	// VMDIR/jail/run.
	Jailed bool `json:"jailed,omitempty"`
	// Cgroup is the QEMU's cgroup when it is not the one named after the
	// VM (a process started ahead by the clone pool keeps its own).
	Cgroup string `json:"cgroup,omitempty"`
	// Chain lists the disk layers below disk.qcow2, top down (chain.go).
	Chain []layer `json:"chain,omitempty"`
	// Backing is the backing file (and format) the overlay's header named
	// when kiln made it: a clone's overlay is a copy of its template's,
	// whose header may name where the template was first written (a
	// template copied by the image cache or linked into a version). A
	// header that changes later was rewritten by the guest's QEMU.
	Backing       string    `json:"backing,omitempty"`
	BackingFormat string    `json:"backing_format,omitempty"`
	PID           int       `json:"pid,omitempty"`
	PIDStart      uint64    `json:"pid_start,omitempty"`
	StartedAt     time.Time `json:"started_at"`
	Reason        string    `json:"reason,omitempty"`
	// A suspend leaves guest memory in the page cache and flushes it in
	// the background; DurableGen catches up with SuspendGen once the
	// flush of that suspend is done. HostBootID tells Recover whether the
	// page cache survived (same boot) when the flush had not finished.
	SuspendGen uint64 `json:"suspend_gen,omitempty"`
	DurableGen uint64 `json:"durable_gen,omitempty"`
	HostBootID string `json:"host_boot_id,omitempty"`
}

type vm struct {
	d   *Driver
	id  string
	dir string
	log *slog.Logger

	op sync.Mutex // serializes operations on this VM

	mu      sync.Mutex // guards the fields below
	meta    meta
	proc    *proc
	qmp     *qmp.Conn
	agent   *client.Client
	console *ring
	// expectExit is set while an operation ends the process on purpose.
	expectExit bool
	gone       bool   // removed from the driver
	uid        uint32 // meta.UID, known to the driver before meta is
	// phases of the last clone or resume, for benchmarks (pool.go).
	phases    StartPhases
	phasesSet bool
	// A pooled process (pool.go) waits for its VM, its TAP (until spawn
	// hands it to QEMU) in a spare namespace of its own.
	pooled  bool
	poolTap *os.File
	poolNS  *os.File
}

func (v *vm) path(name string) string { return filepath.Join(v.dir, name) }

func (v *vm) info() vmm.Info {
	v.mu.Lock()
	defer v.mu.Unlock()
	i := vmm.Info{ID: v.id, State: v.meta.State, Dir: v.dir, MemoryMiB: v.meta.MemoryMiB,
		Template: v.meta.Template, StartedAt: v.meta.StartedAt, Reason: v.meta.Reason}
	if v.proc != nil && v.proc.alive() {
		i.PID = v.proc.pid
	}
	return i
}

// saveMeta writes vm.json atomically (temp file, fsync, rename).
func (v *vm) saveMeta() error {
	return v.writeMeta(true)
}

// writeMeta writes vm.json, flushed to disk with sync. Unflushed, a kiln
// that dies still leaves it for the next Recover (the page cache has it);
// only a host crash can lose or tear it.
func (v *vm) writeMeta(sync bool) error {
	v.mu.Lock()
	b, err := json.MarshalIndent(v.meta, "", "  ")
	v.mu.Unlock()
	if err != nil {
		return err
	}
	if !sync {
		return writeFileRename(v.path("vm.json"), b, false)
	}
	return writeFileAtomic(v.path("vm.json"), b)
}

func writeFileAtomic(path string, b []byte) error {
	return writeFileRename(path, b, true)
}

func writeFileRename(path string, b []byte, sync bool) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if sync {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func loadMeta(dir string) (meta, error) {
	var m meta
	b, err := os.ReadFile(filepath.Join(dir, "vm.json"))
	if err != nil {
		return m, err
	}
	if len(b) > 1<<20 {
		return m, errors.New("vm.json too large")
	}
	return m, json.Unmarshal(b, &m)
}

func (v *vm) setState(s vmm.State, phase string) error {
	v.mu.Lock()
	v.meta.State, v.meta.Phase = s, phase
	v.mu.Unlock()
	return v.saveMeta()
}

// memPath is the file backing guest memory.
func (v *vm) memPath() string {
	if v.meta.MemPrivate {
		return filepath.Join(v.meta.Template, "mem")
	}
	return v.path("mem")
}

// Descriptors QEMU inherits (ExtraFiles start at 3): the disk chain
// (chain.go: the overlay read-write and read-only, then each layer), then
// the TAP.
const (
	diskFD    = 3
	diskFDSet = 2
)

// tapFD is the TAP's descriptor, after the disk chain's.
func (v *vm) tapFD() int { return diskFD + 2 + len(v.meta.Chain) }

// args builds QEMU's command line. incoming adds -incoming defer and -S,
// so the caller loads state and starts the guest itself.
func (v *vm) args(incoming bool) []string {
	m := &v.meta
	p := m.Platform
	mem := fmt.Sprintf("%dM", m.MemoryMiB)
	memPath, kernel, initrd := v.memPath(), m.Kernel, m.Initrd
	if v.jailed() {
		memPath, kernel, initrd = jailMem, jailKernel, jailInitrd
	}
	backend := fmt.Sprintf("memory-backend-file,id=mem0,size=%s,mem-path=%s", mem, memPath)
	if m.MemPrivate {
		// A private mapping: reads come from the shared template pages,
		// writes make private copies; the template never changes.
		backend += ",share=off,readonly=on,rom=off"
	} else {
		backend += ",share=on"
	}
	// tsc=reliable: no clocksource watchdog, which otherwise runs and may
	// switch clocksources in every restored guest.
	cmdline := []string{"console=ttyS0", "panic=-1", "quiet", "loglevel=3", "reboot=t", "tsc=reliable"}
	if m.Net != nil {
		cmdline = append(cmdline, "kiln.ip=172.30.0.2/30", "kiln.gw=172.30.0.1", "kiln.dns=172.30.0.1")
	}
	if m.DeferRoot {
		cmdline = append(cmdline, "kiln.root=defer")
	}
	bus := "pci"
	if p.Machine == "microvm" {
		bus = "device"
	}
	a := []string{
		"-name", "kiln-" + v.id,
		"-machine", fmt.Sprintf("%s,accel=%s,memory-backend=mem0", p.Machine, p.Accel),
		"-cpu", p.CPU,
		"-m", mem,
		"-smp", fmt.Sprint(m.VCPUs),
		"-object", backend,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// The guest is hostile: confine QEMU with its seccomp filter as
		// well as its jail. It starts unprivileged (the jail dropped root
		// before the exec), so no set*id call has any use for it.
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",

		"-chardev", "socket,id=con0,path=" + v.qemuSock("console.sock") + ",server=on,wait=off",
		"-serial", "chardev:con0",
		"-qmp", "unix:" + v.qemuSock("qmp.sock") + ",server=on,wait=off",
	}
	// Every disk layer comes as a descriptor: QEMU reopens the overlay
	// around migrations and must not need any path, least of all one
	// read from a header it could have rewritten.
	a = append(a, v.blockdevArgs(diskFD)...)
	a = append(a,
		// write-cache=on: guest flushes reach the disk, as -drive's
		// default cache=writeback did.
		"-device", "virtio-blk-"+bus+",drive="+topNode+",write-cache=on",
		"-device", "virtio-serial-"+bus+",id=vser0",
		"-chardev", "socket,id=agent0,path="+v.qemuSock("agent.sock")+",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent0,name=kiln.agent",
	)
	a = append(a, v.extraDiskArgs(bus)...)
	if p.Machine == "q35" {
		// A new generation id on every clone makes the kernel reseed its
		// RNG before any user code runs.
		a = append(a, "-device", "vmgenid,guid=auto")
	}
	if m.Net != nil {
		a = append(a, "-netdev", fmt.Sprintf("tap,id=net0,fd=%d", v.tapFD()), // vnet_hdr is read from the fd (opened with IFF_VNET_HDR); QEMU 10 refuses vnet_hdr= with fd=
			"-device", "virtio-net-"+bus+",netdev=net0,mac="+m.Net.MAC)
	}
	if incoming {
		// A restored guest has long since booted: the kernel and initramfs
		// are in its memory already. Leaving them off saves QEMU reading
		// and staging ~20 MB per clone (~50 ms here).
		a = append(a, "-S", "-incoming", "defer")
	} else {
		a = append(a, "-kernel", kernel, "-initrd", initrd, "-append", strings.Join(cmdline, " "))
	}
	return a
}

// spawn starts QEMU (in its jail when kiln is root) and connects QMP. On
// error the process is killed.
func (v *vm) spawn(ctx context.Context, incoming bool) error {
	v.mu.Lock()
	v.meta.Jailed = v.meta.UID != 0
	v.mu.Unlock()
	for _, s := range []string{"qmp.sock", "agent.sock", "console.sock"} {
		os.Remove(v.sockPath(s))
	}
	if l := len(v.sockPath("console.sock")); l > 107 {
		return fmt.Errorf("vm directory %s is too long for unix sockets (%d bytes): use a shorter --data-dir: %w", v.dir, l, errdefs.ErrInvalid)
	}
	if v.meta.Chain == nil {
		// Made by a kiln before chains were recorded: learn it once.
		c, err := v.d.chainFromHeaders(ctx, v.path("disk.qcow2"))
		if err != nil {
			return err
		}
		v.log.Warn("vm had no recorded disk chain: read it from the image headers once")
		v.meta.Chain = c[1:]
	}
	logf, err := os.OpenFile(v.path("qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	files, err := v.openChain()
	if err != nil {
		return err
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if v.poolTap != nil {
		files = append(files, v.poolTap) // made ahead in the spare namespace
		v.poolTap = nil
	} else if n := v.meta.Net; n != nil {
		tap, err := openTap(n.Netns, n.Tap)
		if err != nil {
			return err
		}
		files = append(files, tap)
	}
	extra, err := v.openExtraDisks()
	if err != nil {
		return err
	}
	files = append(files, extra...)
	var cmd *exec.Cmd
	if v.jailed() {
		if err := v.prepareJail(); err != nil {
			return fmt.Errorf("preparing the jail: %w", err)
		}
		if cmd, err = v.jailCommand(incoming, v.args(incoming), files); err != nil {
			return err
		}
	} else {
		cmd = exec.Command(v.d.cfg.QEMU, v.args(incoming)...)
		cmd.Dir = v.dir
		// Its own session: the VM survives kiln's death and is adopted later.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		cmd.ExtraFiles = files
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	p, err := startProc(cmd, v.removeCgroup)
	if err != nil {
		v.removeCgroup()
		return fmt.Errorf("starting %s: %w", v.d.cfg.QEMU, err)
	}
	v.mu.Lock()
	v.proc, v.expectExit = p, false
	v.meta.PID, v.meta.PIDStart = p.pid, p.start
	v.mu.Unlock()
	go v.watch(p)
	if err := v.connectQMP(ctx, p); err != nil {
		v.endProcess(p)
		return err
	}
	if !v.pooled {
		// A pooled guest is paused until its clone, which starts the drain
		// under the VM's own id.
		v.console = newRing(64 << 10)
		go v.console.drain(v.sockPath("console.sock"), p.done, v.d.consoleSink(v.id))
	}
	return nil
}

func (v *vm) connectQMP(ctx context.Context, p *proc) error {
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	qctx, stop := cancelOnExit(qctx, p)
	defer stop()
	q, err := qmp.Dial(qctx, v.sockPath("qmp.sock"))
	if err != nil {
		return v.exitError("connecting to qmp", err, p)
	}
	v.mu.Lock()
	v.qmp = q
	v.mu.Unlock()
	return nil
}

// cancelOnExit derives a context that ends when the process exits, so no
// wait outlives the QEMU it waits on.
func cancelOnExit(ctx context.Context, p *proc) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-p.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// exitError explains a failure, naming QEMU's exit and its last words
// when the process died.
func (v *vm) exitError(what string, err error, p *proc) error {
	select {
	case <-p.done:
	case <-time.After(50 * time.Millisecond):
		// Still running: the guest's console usually says why it is stuck.
		return fmt.Errorf("%s: %w%s", what, err, v.lastWords())
	}
	return fmt.Errorf("%s: qemu %s%s: %w", what, p.status, v.lastWords(), errdefs.ErrUnavailable)
}

// lastWords returns the tail of QEMU's log and the guest console.
func (v *vm) lastWords() string {
	var parts []string
	if b, err := readTail(v.path("qemu.log"), 2048); err == nil && len(b) > 0 {
		parts = append(parts, "qemu log: "+strings.TrimSpace(string(b)))
	}
	if v.console != nil {
		if c := strings.TrimSpace(v.console.String()); c != "" {
			if len(c) > 2048 {
				c = c[len(c)-2048:]
			}
			parts = append(parts, "console: "+c)
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, "; ") + ")"
}

// connectAgent dials the agent's socket and completes the handshake;
// with identity, the guest also takes the host's time, fresh entropy and
// its hostname (a booted guest's clock comes from the emulated RTC, which
// is only second-accurate).
func (v *vm) connectAgent(ctx context.Context, timeout time.Duration, identity bool) error {
	conn, err := v.dialAgent(ctx, timeout)
	if err != nil {
		return err
	}
	return v.handshake(ctx, conn, timeout, identity)
}

// dialAgent connects to QEMU's end of the agent port. Connecting before a
// restored guest runs means the guest never sees its host go away, so its
// agent reads on without waiting to notice a reconnect.
func (v *vm) dialAgent(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	v.mu.Lock()
	p := v.proc
	v.mu.Unlock()
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	actx, stop := cancelOnExit(actx, p)
	defer stop()
	var d net.Dialer
	conn, err := d.DialContext(actx, "unix", v.sockPath("agent.sock"))
	if err != nil {
		return nil, v.exitError("connecting to the agent socket", err, p)
	}
	return conn, nil
}

// handshake starts the agent protocol on conn. With restore, the guest's
// identity is refreshed as part of the handshake.
func (v *vm) handshake(ctx context.Context, conn net.Conn, timeout time.Duration, restore bool) error {
	v.mu.Lock()
	p := v.proc
	v.mu.Unlock()
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	actx, stop := cancelOnExit(actx, p)
	defer stop()
	var c *client.Client
	var err error
	if restore {
		r, rerr := v.identity()
		if rerr != nil {
			conn.Close()
			return rerr
		}
		c, err = client.NewRestored(actx, conn, v.log, r)
	} else {
		c, err = client.New(actx, conn, v.log)
	}
	if err != nil {
		conn.Close()
		return v.exitError("waiting for the guest agent", err, p)
	}
	v.mu.Lock()
	v.agent = c
	v.mu.Unlock()
	return nil
}

// refreshIdentity gives a restored guest new entropy, the current time
// and its hostname, then lets its workloads run again.
func (v *vm) refreshIdentity(ctx context.Context) error {
	r, err := v.identity()
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return v.agent.Restore(rctx, r)
}

// identity is what a restored guest gets: fresh entropy from the host, the
// host's time, and its own hostname.
func (v *vm) identity() (client.RestoreRequest, error) {
	seed := make([]byte, 64)
	if _, err := rand.Read(seed); err != nil {
		return client.RestoreRequest{}, err
	}
	return client.RestoreRequest{Entropy: seed, UnixNano: time.Now().UnixNano(), Hostname: v.meta.Hostname}, nil
}

// watch notices the process's end. An end nobody asked for is reported at
// once and cleaned up as soon as no operation holds the VM.
func (v *vm) watch(p *proc) {
	<-p.done
	v.mu.Lock()
	expected := v.expectExit || v.proc != p || v.gone
	pooled := v.pooled
	v.mu.Unlock()
	if expected {
		return
	}
	if pooled {
		v.log.Warn("pooled process died", "status", p.status)
		v.d.pool.lost(v)
		return
	}
	reason := "qemu " + p.status + v.lastWords()
	v.log.Error("vm process died", "reason", reason)
	// The record says so before the event goes out: whoever hears of the
	// death and inspects the VM sees it stopped, with the reason, even
	// while an operation still holds the VM and the clean-up waits.
	v.mu.Lock()
	if v.proc == p && !v.gone {
		v.meta.State, v.meta.Phase, v.meta.PID, v.meta.Reason = vmm.StateStopped, "", 0, reason
	}
	v.mu.Unlock()
	v.d.emit(vmm.Event{ID: v.id, State: vmm.StateStopped, Reason: reason, Time: time.Now()})
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	if v.proc != p || v.gone {
		v.mu.Unlock()
		return
	}
	v.mu.Unlock()
	v.cleanupDead()
}

// cleanupDead frees what a dead VM held. A running VM's memory died with
// its process, so nothing of it is worth keeping: only a tombstone stays
// in memory so Inspect can tell why.
func (v *vm) cleanupDead() {
	v.detach()
	v.mu.Lock()
	v.meta.State, v.meta.Phase, v.meta.PID = vmm.StateStopped, "", 0
	v.mu.Unlock()
	if err := os.RemoveAll(v.dir); err != nil {
		v.log.Warn("removing vm directory", "err", err)
	}
}

// detach closes the driver's connections to the VM without touching it.
func (v *vm) detach() {
	v.mu.Lock()
	q, a := v.qmp, v.agent
	v.qmp, v.agent = nil, nil
	v.mu.Unlock()
	if a != nil {
		a.Close()
	}
	if q != nil {
		q.Close()
	}
}

// endProcess stops the process on purpose: quit through QMP, then kill.
func (v *vm) endProcess(p *proc) {
	v.mu.Lock()
	v.expectExit = true
	q := v.qmp
	v.mu.Unlock()
	if q != nil && p.alive() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		q.Execute(ctx, "quit", nil, nil)
		cancel()
		p.waitExit(3 * time.Second)
	}
	p.kill()
	p.waitExit(5 * time.Second)
	v.detach()
}
