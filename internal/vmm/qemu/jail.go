//go:build linux

package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Every QEMU runs in a jail (internal/jail): its VM's network namespace
// (or a new empty one), new mount, PID, IPC and UTS namespaces, the root
// pivoted into VMDIR/jail, the VM's own uid from the first instruction
// (QEMU never parses the disk, the state or anything else a guest wrote
// as root), no capabilities, no_new_privs, an empty environment, rlimits
// and a cgroup of its own. The jail holds only:
//
//	/usr, /lib*, /bin, /sbin, /etc/ld.so.cache  read-only (QEMU, its libraries, firmware in /usr/share)
//	/vm/kernel, /vm/initrd                     read-only, for a cold boot
//	/vm/mem                                    the memory file: the template's read-only for a clone, its own read-write otherwise
//	/run                                       VMDIR/jail/run, owned by the uid: QEMU's qmp, agent and console sockets
//	/dev                                       null, zero, urandom, random (and kvm under KVM)
//	/proc                                      of its own PID namespace
//
// Disks, device state and the TAP come as descriptors kiln opened.
const (
	jailDir     = "jail"
	jailRunDir  = "jail/run"
	jailMem     = "/vm/mem"
	jailKernel  = "/vm/kernel"
	jailInitrd  = "/vm/initrd"
	jailSockDir = "/run"
)

// Memory a QEMU may use beyond guest RAM before its cgroup stops it.
// Guest RAM is a file mapping (RssFile); QEMU's own memory (heap, the TCG
// translation buffer, device and migration buffers) is anonymous.
// Measured here (QEMU 10.0, TCG, q35, 512 MiB guest, after a boot and
// 200 MiB of guest work with md5sum and gzip): RssAnon 116-120 MiB, cgroup
// peak 121 MiB above the guest's pages. The translation buffer grows with
// the variety of code a guest runs (QEMU reserves up to 1 GiB for it and
// touches it lazily), so the limit leaves three times the measured peak.
const memOverheadBytes = 384 << 20

// Limits of a VM's QEMU. Threads count as processes: a QEMU has a main
// loop, an RCU thread, one thread per vCPU and up to 64 I/O workers.
const (
	qemuNOFILE   = 4096
	qemuProcsMin = 128
)

// jailed says whether this VM's QEMU runs (or ran) in a jail: only root
// can build one; VMs started by a kiln before the jail keep their layout.
func (v *vm) jailed() bool { return v.meta.Jailed }

// sockPath is where kiln reaches QEMU's socket name.
func (v *vm) sockPath(name string) string {
	if v.jailed() {
		return v.path(filepath.Join(jailRunDir, name))
	}
	return v.path(name)
}

// qemuSock is the same socket as QEMU names it.
func (v *vm) qemuSock(name string) string {
	if v.jailed() {
		return jailSockDir + "/" + name
	}
	return v.path(name)
}

// cgroupName is the VM's cgroup. The suffix (a hash of the VMs
// directory) keeps two kilns on one host (two data dirs) apart.
func (d *Driver) cgroupName(id string) string {
	return cgroupParent + "/" + id + "." + d.cgroupSuffix()
}

const cgroupParent = "kiln"

func (d *Driver) cgroupSuffix() string {
	h := sha256.Sum256([]byte(d.vmsDir()))
	return hex.EncodeToString(h[:4])
}

// cgroup is the VM's cgroup: named after the VM, or after the pooled
// process it was started as.
func (v *vm) cgroup() string {
	if v.meta.Cgroup != "" {
		return v.meta.Cgroup
	}
	return v.d.cgroupName(v.id)
}

// removeCgroup removes the VM's cgroup once its QEMU is gone.
func (v *vm) removeCgroup() {
	if !v.jailed() {
		return
	}
	if err := jail.RemoveCgroup(v.cgroup()); err != nil {
		v.log.Warn("removing the vm's cgroup", "err", err)
	}
}

// prepareJail makes VMDIR/jail (root's, 0755: it becomes "/") and its
// run directory (the VM uid's), and gives the VM's own memory file to the
// uid.
func (v *vm) prepareJail() error {
	if err := os.MkdirAll(v.path(jailDir), 0o755); err != nil {
		return err
	}
	if err := os.Chmod(v.path(jailDir), 0o755); err != nil {
		return err
	}
	run := v.path(jailRunDir)
	if err := os.MkdirAll(run, 0o700); err != nil {
		return err
	}
	if err := os.Chown(run, int(v.meta.UID), int(v.meta.UID)); err != nil {
		return err
	}
	if !v.meta.MemPrivate {
		// QEMU maps its own memory file shared and writes to it; kiln
		// wrote it (suspend) or it is new (boot).
		f, err := os.OpenFile(v.path("mem"), os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		err = f.Chown(int(v.meta.UID), int(v.meta.UID))
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// jailCommand wraps QEMU's command line in the VM's jail.
func (v *vm) jailCommand(incoming bool, args []string, files []*os.File) (*exec.Cmd, error) {
	qemuBin, err := exec.LookPath(v.d.cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("finding %s: %w", v.d.cfg.QEMU, err)
	}
	if qemuBin, err = filepath.Abs(qemuBin); err != nil {
		return nil, err
	}
	binds := jail.SystemBinds()
	if !strings.HasPrefix(qemuBin, "/usr/") {
		binds = append(binds, jail.Bind{Src: qemuBin, Dst: qemuBin, ReadOnly: true})
	}
	binds = append(binds,
		jail.Bind{Src: v.path(jailRunDir), Dst: jailSockDir},
		jail.Bind{Src: v.memPath(), Dst: jailMem, ReadOnly: v.meta.MemPrivate})
	if !incoming {
		binds = append(binds,
			jail.Bind{Src: v.meta.Kernel, Dst: jailKernel, ReadOnly: true},
			jail.Bind{Src: v.meta.Initrd, Dst: jailInitrd, ReadOnly: true})
	}
	devices := []string{"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}
	if v.meta.Platform.Accel == vmm.AccelKVM {
		devices = append(devices, "/dev/kvm")
	}
	netns := ""
	if v.meta.Net != nil {
		netns = v.meta.Net.Netns
	}
	mem := int64(v.meta.MemoryMiB) << 20
	procs := uint64(qemuProcsMin + 2*v.meta.VCPUs)
	return jail.Command(context.Background(), jail.Spec{
		Root:    v.path(jailDir),
		Binds:   binds,
		Devices: devices,
		NetNS:   netns,
		UID:     v.meta.UID, GID: v.meta.UID,
		Rlimits: jail.Rlimits{NOFILE: qemuNOFILE, NPROC: procs, FSIZE: v.fileSizeLimit()},
		Cgroup: &jail.CgroupSpec{Name: v.cgroup(), MemoryBytes: mem + memOverheadBytes,
			Pids: int64(procs), CPUWeight: uint64(100 * v.meta.VCPUs)},
		Path:       qemuBin,
		Args:       append([]string{qemuBin}, args...),
		Dir:        jailSockDir,
		ExtraFiles: files,
	})
}

// fileSizeLimit bounds any file QEMU writes: the disk overlay (at most
// about its virtual size, which is the base disk's, plus metadata), its
// memory file and the device state. A doubled disk plus guest RAM plus
// 1 GiB is far above any of them.
func (v *vm) fileSizeLimit() uint64 {
	var disk int64
	if len(v.meta.Chain) > 0 {
		if st, err := os.Stat(v.meta.Chain[len(v.meta.Chain)-1].Path); err == nil {
			disk = st.Size()
		}
	}
	if disk == 0 {
		disk = 64 << 30
	}
	for _, x := range v.meta.Disks {
		if st, err := os.Stat(x.Path); err == nil {
			disk = max(disk, st.Size())
		}
	}
	return uint64(2*disk + int64(v.meta.MemoryMiB)<<20 + 1<<30)
}

// jailRoots maps the jail roots of this driver's VMs (device, inode) so
// a QEMU whose command line names no host path can still be told ours.
func (d *Driver) jailRoots() map[[2]uint64]bool {
	out := map[[2]uint64]bool{}
	for _, dir := range []string{d.vmsDir(), d.poolDir()} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if k, ok := statKey(filepath.Join(dir, e.Name(), jailDir)); ok {
				out[k] = true
			}
		}
	}
	return out
}
