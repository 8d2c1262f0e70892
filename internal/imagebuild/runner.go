//go:build linux

// Package imagebuild runs image builds in real microVMs: Runner executes
// a Dockerfile's RUN steps in build VMs (image.Runner), and Builder turns
// a code package into an image version: the root disk, then a VM booted
// from it with the app started and ready, snapshotted into a template
// that every microVM of the version is cloned from.
package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Runner runs RUN steps in build microVMs booted by Driver. Each step gets
// a fresh VM with internet egress (NAT, DNS through the gateway's
// forwarder), booted on a qcow2 overlay of the step's disk; after a clean
// shutdown the overlay is committed into the disk, which is returned.
type Runner struct {
	Driver vmm.Driver
	// MemoryMiB of a build VM; 0 = 1024. VCPUs; 0 = the host's CPUs, at
	// most 4: even a single apt-get runs xz and dpkg side by side, which
	// under TCG made go-multistage's apt step 2m08s on 1 vCPU and 1m23s
	// on 2.
	MemoryMiB int
	VCPUs     int
	// DNSUpstreams override the host's resolvers for build VMs.
	DNSUpstreams []string
	// ExtraDeny is the operator's --deny-cidr: build VMs may not reach it
	// either (see netns.Config.ExtraDeny).
	ExtraDeny []netip.Prefix
	// Packages, if set, is the package proxy: build VMs' plain HTTP to
	// the operator's Debian mirrors goes through it and is cached per
	// account (image.RunStep.Account), so a rebuild after a change above
	// an apt-get step downloads nothing it already had. Without it the
	// guest reaches a mirror only if the mirror is not on the deny list.
	Packages *pkgproxy.Proxy
	Logger   *slog.Logger
	// Times, if set, learns where each step's time went (the apt bench
	// reports it). It is called once per step that ran to the end.
	Times func(StepTimes)
	// WarmDir, if set, is where the runner keeps snapshots of build VMs
	// booted short of their disks, one per VM shape, and starts each
	// step's VM from one instead of booting a kernel (warm.go). It is
	// this runner's alone: what an earlier runner left there is removed
	// at first use. Close removes the runner's own.
	WarmDir string

	warm warmTemplates
}

// StepTimes is where one RUN step's time went in Runner.Run.
type StepTimes struct {
	Line int
	// Inspect: reading the root before the step (what the agent may
	// change). Boot: network, QEMU and the agent's hello. Exec: mounting,
	// the command and unmounting. Stop: the clean shutdown. Commit: the
	// overlay into the root disk. Finish: the journal check and undoing
	// the agent's files.
	Inspect, Boot, Exec, Stop, Commit, Finish time.Duration
}

var _ image.Runner = (*Runner)(nil)

// DefaultRunMemoryMiB is a build VM's memory when Runner.MemoryMiB is 0.
const DefaultRunMemoryMiB = 1024

func (r *Runner) vcpus() int {
	if r.VCPUs > 0 {
		return r.VCPUs
	}
	return min(runtime.NumCPU(), 4)
}

func (r *Runner) logger() *slog.Logger {
	if r.Logger != nil {
		return r.Logger
	}
	return slog.Default()
}

// Run implements image.Runner. rootDisk is changed in place (the overlay
// is committed into it) and returned.
func (r *Runner) Run(ctx context.Context, rootDisk string, step image.RunStep, log io.Writer) (string, error) {
	if log == nil {
		log = io.Discard
	}
	if len(step.Args) == 0 {
		return "", errors.New("RUN has no command")
	}
	disk, err := filepath.Abs(rootDisk)
	if err != nil {
		return "", err
	}
	mem := r.MemoryMiB
	if mem == 0 {
		mem = DefaultRunMemoryMiB
	}
	wd := step.WorkDir
	if wd == "" {
		wd = "/"
	}
	// The workdir is made on the host, so that roots without mkdir (FROM
	// scratch) work too; it is root-owned, as docker makes it.
	if wd != "/" {
		if _, err := rootfs.Stat(ctx, disk, wd); err != nil {
			if err := rootfs.Mkdir(ctx, disk, wd); err != nil {
				return "", fmt.Errorf("creating workdir %s: %w", wd, err)
			}
		}
	}
	times := StepTimes{Line: step.Line}
	lap := lapper()
	before, err := captureRoot(ctx, disk)
	if err != nil {
		return "", fmt.Errorf("inspecting root disk: %w", err)
	}
	lap(&times.Inspect)

	disks, specs := stepMounts(step.Mounts)
	g, err := r.startStepVM(ctx, vmSpec{prefix: PrefixBuild, rootDisk: disk, memoryMiB: mem, vcpus: r.vcpus(), egress: true, upstreams: r.DNSUpstreams, extraDeny: r.ExtraDeny, scratch: true, disks: disks,
		packages: r.Packages, account: step.Account})
	if err != nil {
		return "", err
	}
	defer g.close()
	lap(&times.Boot)
	g.log.Debug("build vm booted", "ms", times.Boot.Milliseconds(), "line", step.Line)

	if err := r.execMounted(ctx, g, step, specs, wd, log); err != nil {
		return "", err
	}
	lap(&times.Exec)

	// A clean shutdown syncs and unmounts the root, so the overlay holds
	// a consistent file system.
	if err := r.Driver.Stop(ctx, g.id); err != nil {
		return "", fmt.Errorf("stopping the build vm: %w", err)
	}
	lap(&times.Stop)
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := r.Driver.CommitDisk(ctx, g.id); err != nil {
		return "", fmt.Errorf("committing the build vm's disk: %w", err)
	}
	lap(&times.Commit)
	if err := g.close(); err != nil {
		return "", err
	}
	clean, err := rootfs.Clean(ctx, disk)
	if err != nil {
		return "", err
	}
	if !clean {
		// The guest did not unmount in time (Stop killed it): replay the
		// journal so the image is consistent.
		r.logger().Warn("build vm root not cleanly unmounted; repairing", "disk", disk)
		if err := rootfs.Repair(ctx, disk); err != nil {
			return "", fmt.Errorf("root disk left inconsistent by the build vm: %w", err)
		}
	}
	if err := restoreRoot(ctx, disk, before); err != nil {
		return "", fmt.Errorf("removing the agent's files from the root: %w", err)
	}
	lap(&times.Finish)
	if r.Times != nil {
		r.Times(times)
	}
	return disk, nil
}

// lapper returns lap, which sets *d to the time since the last lap (or
// since lapper).
func lapper() func(d *time.Duration) {
	t := time.Now()
	return func(d *time.Duration) {
		now := time.Now()
		*d, t = now.Sub(t), now
	}
}

// stepMounts maps a step's mounts to the build VM's extra disks and the
// guest agent's mount requests.
func stepMounts(ms []image.RunMount) ([]vmm.Disk, []proto.MountSpec) {
	var disks []vmm.Disk
	var specs []proto.MountSpec
	for _, m := range ms {
		sp := proto.MountSpec{Target: m.Target, ReadOnly: m.ReadOnly, Sub: m.Sub}
		if m.Type == dockerfile.MountTmpfs {
			sp.Kind, sp.SizeBytes = proto.MountTmpfs, m.SizeBytes
		} else {
			sp.Kind, sp.Serial = proto.MountDisk, fmt.Sprintf("kiln-mount-%d", len(disks))
			sp.Init, sp.Mode, sp.UID, sp.GID = m.Fresh, m.Mode, m.UID, m.GID
			disks = append(disks, vmm.Disk{Path: m.Disk, ReadOnly: m.ReadOnly, Serial: sp.Serial})
		}
		specs = append(specs, sp)
	}
	return disks, specs
}

// execMounted mounts the step's RUN --mount file systems in the guest,
// runs the step, and unmounts them. What the step wrote under a mount is
// on that mount's disk, never in the root, whether or not the unmount
// works.
func (r *Runner) execMounted(ctx context.Context, g *guestVM, step image.RunStep, specs []proto.MountSpec, wd string, log io.Writer) error {
	if len(specs) == 0 {
		return r.exec(ctx, g, step, wd, log)
	}
	a, err := r.Driver.Agent(ctx, g.id)
	if err != nil {
		return fmt.Errorf("connecting to the build vm's agent: %w", err)
	}
	mctx, cancel := context.WithTimeout(ctx, mountTimeout)
	err = a.Mount(mctx, specs)
	cancel()
	if err != nil {
		return &image.MountError{Index: failedMount(err, specs), Err: err}
	}
	runErr := r.exec(ctx, g, step, wd, log)
	if ctx.Err() != nil {
		return runErr
	}
	mctx, cancel = context.WithTimeout(ctx, mountTimeout)
	usage, err := a.Unmount(mctx)
	cancel()
	if err != nil {
		// The shutdown unmounts what is left.
		g.log.Warn("unmounting the step's mounts", "err", err)
	}
	if runErr != nil {
		for i, u := range usage {
			if i < len(step.Mounts) && step.Mounts[i].Type == dockerfile.MountCache && mountFull(u) {
				return &image.MountFullError{Err: runErr, Name: step.Mounts[i].Name, Target: step.Mounts[i].Target, SizeBytes: u.TotalBytes}
			}
		}
	}
	return runErr
}

// mountTimeout bounds the agent's mounting and unmounting of a step's
// file systems.
const mountTimeout = 30 * time.Second

// mountFull says a cache had no room left: under 1 MiB or no inode free.
// The figures come from the guest: they only pick a message.
func mountFull(u proto.MountUsage) bool {
	return u.TotalBytes > 0 && (u.FreeBytes < 1<<20 || (u.TotalInodes > 0 && u.FreeInodes == 0))
}

// failedMount finds which mount the agent's error names ("mount TARGET:
// ..."), or -1.
func failedMount(err error, specs []proto.MountSpec) int {
	msg := err.Error()
	for i, sp := range specs {
		if strings.Contains(msg, "mount "+sp.Target+": ") {
			return i
		}
	}
	return -1
}

// exec runs the step and streams its output to log.
func (r *Runner) exec(ctx context.Context, g *guestVM, step image.RunStep, wd string, log io.Writer) error {
	a, err := r.Driver.Agent(ctx, g.id)
	if err != nil {
		return fmt.Errorf("connecting to the build vm's agent: %w", err)
	}
	sctx := ctx
	if step.Timeout > 0 {
		var cancel context.CancelFunc
		sctx, cancel = context.WithTimeout(ctx, step.Timeout)
		defer cancel()
	}
	p, err := a.Exec(sctx, client.ExecRequest{
		Argv: step.Args, Env: step.Env, Cwd: wd,
		User: step.User,
	})
	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		return fmt.Errorf("starting %q: %w", step.Args[0], err)
	}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		for chunk := range p.Output() {
			_, _ = log.Write(chunk.Data)
		}
	}()
	select {
	case <-p.Exited():
	case <-sctx.Done():
		// Ending the VM ends the command and its output stream; wait for
		// the copier so nothing writes to log after Run returns.
		g.close()
		select {
		case <-copied:
		case <-time.After(5 * time.Second):
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fmt.Fprintf(log, "\nRUN timed out after %s\n", step.Timeout)
		return fmt.Errorf("RUN timed out after %s", step.Timeout)
	}
	<-copied
	code, err := p.Wait(ctx)
	if err != nil {
		return fmt.Errorf("waiting for the command: %w", err)
	}
	if n := p.Dropped(); n > 0 {
		fmt.Fprintf(log, "(%d bytes of output dropped)\n", n)
	}
	if code != 0 {
		return &image.ExitError{Code: code}
	}
	return nil
}

// The guest agent writes into the root it switches to: /etc/resolv.conf
// (pointing at the gateway's DNS forwarder) and the mount points /dev,
// /proc and /sys when missing. A build must not keep them, so the runner
// records what was there before the step and puts it back afterwards,
// unless the step itself changed the file.

var agentResolvConf = "nameserver " + netns.GatewayAddr.String() + "\n"

const (
	resolvConf    = "/etc/resolv.conf"
	maxResolvConf = 64 << 10
)

type rootState struct {
	resolvKind   uint32 // S_IFREG, S_IFLNK, other; 0 = absent
	resolvData   []byte
	resolvTarget string
	resolvMode   uint32
	resolvUID    int
	resolvGID    int
	missingDirs  []string
}

func captureRoot(ctx context.Context, disk string) (rootState, error) {
	var s rootState
	for _, d := range []string{"/dev", "/proc", "/sys", "/etc"} {
		if _, err := rootfs.Stat(ctx, disk, d); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				return s, err
			}
			s.missingDirs = append(s.missingDirs, d)
		}
	}
	fi, err := rootfs.Stat(ctx, disk, resolvConf)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return s, nil
		}
		return s, err
	}
	s.resolvKind = fi.Mode & syscall.S_IFMT
	s.resolvMode, s.resolvUID, s.resolvGID = fi.Mode&0o7777, fi.UID, fi.GID
	switch s.resolvKind {
	case syscall.S_IFREG:
		// Bounded: resolv.conf is small; a huge one is not restored.
		if fi.Size <= maxResolvConf {
			if s.resolvData, err = rootfs.ReadFile(ctx, disk, resolvConf, maxResolvConf); err != nil {
				return s, err
			}
		} else {
			s.resolvKind = 0xffff
		}
	case syscall.S_IFLNK:
		if s.resolvTarget, err = rootfs.Readlink(ctx, disk, resolvConf); err != nil {
			return s, err
		}
	}
	return s, nil
}

func restoreRoot(ctx context.Context, disk string, s rootState) error {
	fi, err := rootfs.Stat(ctx, disk, resolvConf)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// The step removed it, or the VM had no network: nothing to undo.
	case err != nil:
		return err
	case fi.Mode&syscall.S_IFMT == syscall.S_IFREG && fi.Size == int64(len(agentResolvConf)):
		b, err := rootfs.ReadFile(ctx, disk, resolvConf, maxResolvConf)
		if err != nil {
			return err
		}
		if !bytes.Equal(b, []byte(agentResolvConf)) || (s.resolvKind == syscall.S_IFREG && bytes.Equal(s.resolvData, b)) {
			break // the step wrote it, or it was there before
		}
		switch s.resolvKind {
		case 0:
			err = rootfs.Remove(ctx, disk, resolvConf)
		case syscall.S_IFREG:
			err = rootfs.WriteFile(ctx, disk, resolvConf, s.resolvData, s.resolvMode, s.resolvUID, s.resolvGID)
		case syscall.S_IFLNK:
			if err = rootfs.Remove(ctx, disk, resolvConf); err == nil {
				err = rootfs.Symlink(ctx, disk, resolvConf, s.resolvTarget)
			}
		}
		if err != nil {
			return err
		}
	}
	// Mount points the agent had to create; left alone if the step put
	// something in them.
	for i := len(s.missingDirs) - 1; i >= 0; i-- {
		_ = rootfs.Remove(ctx, disk, s.missingDirs[i])
	}
	return nil
}
