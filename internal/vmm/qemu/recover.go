//go:build linux

package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Recover implements vmm.Driver. It reads every VM directory, decides from
// the recorded state and phase and from what still runs, and then kills
// any QEMU process of this data directory that no record claims.
func (d *Driver) Recover(ctx context.Context) (vmm.RecoveryReport, error) {
	var rep vmm.RecoveryReport
	entries, err := os.ReadDir(d.vmsDir())
	if err != nil {
		return rep, err
	}
	claimed := map[int]bool{}
	live := map[string]bool{}
	if d.pool != nil {
		// This driver's own pooled processes are no strays; a dead kiln's
		// are, and their directories go below.
		for pid, dir := range d.pool.live() {
			claimed[pid] = true
			live[dir] = true
		}
	}
	for _, e := range entries {
		dir := filepath.Join(d.vmsDir(), e.Name())
		d.mu.Lock()
		known := d.vms[e.Name()]
		d.mu.Unlock()
		if known != nil {
			// Already ours (adopted or started since): its QEMU, found by
			// its jail root or cgroup below, is no stray.
			known.mu.Lock()
			if known.proc != nil {
				claimed[known.proc.pid] = true
			}
			known.mu.Unlock()
			continue
		}
		id, outcome, pid := d.recoverOne(ctx, dir)
		switch outcome {
		case "adopted":
			rep.Adopted = append(rep.Adopted, id)
			claimed[pid] = true
		case "suspended", "stopped":
			rep.Suspended = append(rep.Suspended, id)
		default:
			// Say why: a VM removed here is a microVM the engine reports
			// lost, and the operator needs the cause.
			d.log.Warn("recovery removed a vm", "vm", e.Name(), "why", outcome)
			rep.Removed = append(rep.Removed, e.Name()+": "+outcome)
		}
	}
	for _, pid := range d.killStrays(claimed) {
		rep.Removed = append(rep.Removed, fmt.Sprintf("qemu process %d with no vm record: killed", pid))
	}
	d.removePoolLeftovers(live)
	d.log.Info("recovered vms", "adopted", len(rep.Adopted), "suspended", len(rep.Suspended), "removed", len(rep.Removed))
	return rep, nil
}

// recoverOne returns the VM id, what became of it, and its adopted pid.
func (d *Driver) recoverOne(ctx context.Context, dir string) (string, string, int) {
	m, err := loadMeta(dir)
	name := filepath.Base(dir)
	if err != nil || m.ID != name || !idRe.MatchString(m.ID) {
		d.killRecorded(m)
		os.RemoveAll(dir)
		return name, "no readable vm.json: removed", 0
	}
	v := &vm{d: d, id: m.ID, dir: dir, log: d.log.With("microvm", m.ID), meta: m, uid: m.UID}
	var p *proc
	if m.PID > 0 {
		p, _ = adoptProc(m.PID, m.PIDStart, v.removeCgroup)
	}
	remove := func(why string) (string, string, int) {
		if p != nil {
			p.kill()
			p.waitExit(5 * time.Second)
		}
		v.removeCgroup()
		os.RemoveAll(dir)
		return m.ID, why + ": removed", 0
	}
	keepSuspended := func() (string, string, int) {
		if p != nil {
			p.kill()
			p.waitExit(5 * time.Second)
		}
		v.removeCgroup()
		if !fileExists(v.path("state")) || !fileExists(v.path("mem")) || !fileExists(v.path("disk.qcow2")) {
			return remove("suspended but its files are incomplete")
		}
		if m.DurableGen != m.SuspendGen && m.HostBootID != d.hostBootID() {
			return remove("suspended, but the host restarted before its memory reached the disk")
		}
		v.meta.State, v.meta.Phase, v.meta.PID, v.meta.PIDStart = vmm.StateSuspended, "", 0, 0
		v.meta.MemPrivate = false
		v.saveMeta()
		d.mu.Lock()
		d.vms[m.ID] = v
		d.mu.Unlock()
		return m.ID, "suspended", 0
	}
	switch {
	case m.State == vmm.StateStopped:
		d.mu.Lock()
		d.vms[m.ID] = v
		d.mu.Unlock()
		return m.ID, "stopped", 0
	case m.State == vmm.StateSuspended:
		// Resuming but the guest never ran: the files are as suspended.
		return keepSuspended()
	case m.Phase == phaseBooting:
		return remove("interrupted while booting")
	case m.Phase == phaseSuspending && fileExists(v.path("state")) && fileExists(v.path("mem")):
		// The save was complete ("state" is renamed into place last) and
		// kiln died before or while QEMU quit: the suspend stands, even if
		// the process still lives (its guest is stopped for good).
		return keepSuspended()
	case m.Phase == phaseSuspending && (p == nil || !p.alive()):
		// "state" appears only once complete (renamed into place), and a
		// clone's "mem" only after a complete dump.
		if fileExists(v.path("state")) && fileExists(v.path("mem")) {
			return keepSuspended()
		}
		return remove("process gone while suspending")
	case p == nil || !p.alive():
		return remove("its process is gone")
	}
	// A live process: adopt it and make sure the guest runs.
	v.proc = p
	if err := v.connectQMP(ctx, p); err != nil {
		return remove("qmp does not answer")
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	var st struct {
		Status string `json:"status"`
	}
	err = v.qmp.Execute(cctx, "query-status", nil, &st)
	cancel()
	if err != nil {
		v.detach()
		return remove("qmp does not answer")
	}
	for _, f := range []string{"state", "state.tmp", "mem.tmp"} {
		os.Remove(v.path(f))
	}
	if m.MemPrivate {
		os.Remove(v.path("mem"))
	}
	if st.Status != "running" {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := v.qmp.Execute(cctx, "cont", nil, nil)
		cancel()
		if err != nil {
			v.detach()
			return remove("cannot restart a paused guest (" + st.Status + ")")
		}
	}
	v.console = newRing(64 << 10)
	go v.console.drain(v.sockPath("console.sock"), p.done, v.d.consoleSink(v.id))
	if err := v.connectAgent(ctx, 10*time.Second, false); err != nil {
		v.detach()
		return remove("agent does not answer")
	}
	if m.Phase != "" {
		// Interrupted mid-suspend or mid-restore: workloads may be frozen.
		v.refreshIdentity(ctx)
	}
	v.meta.Phase = ""
	v.saveMeta()
	d.mu.Lock()
	d.vms[m.ID] = v
	d.mu.Unlock()
	go v.watch(p)
	return m.ID, "adopted", p.pid
}

func (d *Driver) killRecorded(m meta) {
	if m.PID <= 0 {
		return
	}
	if p, err := adoptProc(m.PID, m.PIDStart, nil); err == nil {
		p.kill()
		p.waitExit(5 * time.Second)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// Processes lists the QEMU processes of dataDir's VMs and pool, found as
// recovery finds its strays: for checks, with kiln stopped, that it left
// none.
func Processes(dataDir string) []int {
	var pids []int
	for _, s := range dataDirOnly(dataDir).strayProcesses(nil) {
		pids = append(pids, s.pid)
	}
	return pids
}

// KillProcesses kills what Processes lists, as recovery kills strays (a
// pid reused since the scan is spared), and removes the VM cgroups left
// empty: the clean-up after a kiln that failed.
func KillProcesses(dataDir string) []int { return dataDirOnly(dataDir).killStrays(nil) }

// CgroupSuffix is the mark dataDir's VM cgroups carry after their VM id.
func CgroupSuffix(dataDir string) string { return dataDirOnly(dataDir).cgroupSuffix() }

// dataDirOnly is a driver that knows only its data directory: enough to
// name and find what its VMs left on the host.
func dataDirOnly(dataDir string) *Driver {
	return &Driver{cfg: Config{DataDir: dataDir}, log: slog.New(slog.DiscardHandler)}
}

// killStrays kills the QEMU processes of this data directory that claimed
// does not hold, waits for each to end, and then removes the VM cgroups
// left empty. It returns the pids it killed.
func (d *Driver) killStrays(claimed map[int]bool) (killed []int) {
	for _, s := range d.strayProcesses(claimed) {
		// The start time read with the scan makes a pid reused since
		// fail here rather than be killed.
		p, err := adoptProc(s.pid, s.start, nil)
		if err != nil {
			continue
		}
		p.kill()
		p.waitExit(5 * time.Second)
		killed = append(killed, s.pid)
	}
	d.removeStrayCgroups()
	return killed
}

// strayProc is a QEMU process found by strayProcesses, with its start
// time so that a later kill can tell it from a process given its pid since.
type strayProc struct {
	pid   int
	start uint64
}

// strayProcesses lists QEMU processes of this driver's data directory
// (by jail root, cgroup or command line) that no record claims.
func (d *Driver) strayProcesses(claimed map[int]bool) []strayProc {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	prefix := d.vmsDir() + string(filepath.Separator)
	poolPrefix := d.poolDir() + string(filepath.Separator)
	roots := d.jailRoots()
	cgroupMark := "." + d.cgroupSuffix() + "\n"
	ours := func(pid int) bool {
		args, err := procCmdline(pid)
		if err != nil || len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu") {
			return false
		}
		dir := "/proc/" + strconv.Itoa(pid)
		// A jailed QEMU names only paths inside its jail: its root or its
		// cgroup tells.
		if k, ok := statKey(dir + "/root"); ok && roots[k] {
			return true
		}
		if b, err := readProcFile(pid, "cgroup"); err == nil && strings.Contains(string(b), "/"+cgroupParent+"/") &&
			strings.Contains(string(b), cgroupMark) {
			return true
		}
		for _, a := range args {
			if namesDir(a, prefix) || namesDir(a, poolPrefix) {
				return true
			}
		}
		return false
	}
	var out []strayProc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || claimed[pid] {
			continue
		}
		// Read before and after the checks: the same start time means
		// they all read the one process.
		start, err := procStartTime(pid)
		if err != nil || !ours(pid) {
			continue
		}
		if again, err := procStartTime(pid); err == nil && again == start {
			out = append(out, strayProc{pid, start})
		}
	}
	return out
}

// namesDir says whether arg names a path under dir (which ends in a
// separator): as the whole argument or as an option's value ("path=",
// "unix:", a list after ","), so that another data directory whose path
// merely ends in dir's (/x/var/lib/kiln for /var/lib/kiln) is not taken
// for this one.
func namesDir(arg, dir string) bool {
	for i := 0; ; {
		j := strings.Index(arg[i:], dir)
		if j < 0 {
			return false
		}
		i += j
		if i == 0 || strings.IndexByte("=:,", arg[i-1]) >= 0 {
			return true
		}
		i++
	}
}

// removeStrayCgroups removes this driver's VM cgroups that no live VM
// holds (left by a kiln that died between a QEMU's end and the removal).
func (d *Driver) removeStrayCgroups() {
	if jail.Supported() != nil || jail.CgroupVersion() == "" {
		return
	}
	names, err := jail.ListCgroups(cgroupParent)
	if err != nil {
		return
	}
	suffix := "." + d.cgroupSuffix()
	for _, n := range names {
		id, ok := strings.CutSuffix(strings.TrimPrefix(n, cgroupParent+"/"), suffix)
		if !ok {
			continue
		}
		d.mu.Lock()
		v := d.vms[id]
		d.mu.Unlock()
		if v != nil {
			v.mu.Lock()
			alive := v.proc != nil && v.proc.alive()
			v.mu.Unlock()
			if alive {
				continue
			}
		}
		if jail.CgroupPopulated(n) {
			continue
		}
		if err := jail.RemoveCgroup(n); err != nil {
			d.log.Warn("removing a stray vm cgroup", "cgroup", n, "err", err)
		}
	}
}
