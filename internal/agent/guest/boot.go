//go:build linux

package guest

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	modulesDir  = "/lib/modules/kiln"
	newRoot     = "/newroot"
	rootDevice  = "/dev/vda"
	cgroupRoot  = "/sys/fs/cgroup"
	workloadsCg = "/sys/fs/cgroup/workloads"
	diskWait    = 5 * time.Second
	virtioBlkID = "0x0002"
	virtioNetID = "0x0001"
	mountNoExec = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	resolvConf  = "/etc/resolv.conf"
)

// BootResult is what Boot found.
type BootResult struct {
	// SwitchedRoot is true when /dev/vda became the root; false means the
	// agent runs on the initramfs.
	SwitchedRoot bool
	// CgroupDir is the workload cgroup, "" if cgroup v2 is unavailable.
	CgroupDir string
	Params    map[string]string
	// Steps holds how long each boot step took, for the boot log line.
	Steps []any
	// RootDisk is set when the root was deferred (kiln.root=defer): it
	// loads the block driver, mounts /dev/vda and switches root, once.
	RootDisk func() error
}

// Boot does what an init does before it can supervise workloads: mounts
// the API filesystems, loads kernel modules from the initramfs, switches
// root to /dev/vda (staying PID 1), sets up networking and the workload
// cgroup. kiln.debug=1 on the kernel command line sets level to debug.
// Steps that fail are logged; Boot carries on where it can, because
// an agent that answers the host is far easier to debug than a dead guest.
func Boot(log *slog.Logger, level *slog.LevelVar) BootResult {
	res := BootResult{}
	for _, m := range []struct{ src, dst, typ string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := mount(m.src, m.dst, m.typ, mountFlags(m.typ), ""); err != nil {
			log.Error("mounting", "dst", m.dst, "err", err)
		}
	}
	res.Params = kernelParams()
	if res.Params["kiln.debug"] == "1" && level != nil {
		level.Set(slog.LevelDebug)
	}
	t := time.Now()
	step := func(name string) {
		res.Steps = append(res.Steps, name, time.Since(t).Round(time.Microsecond))
		t = time.Now()
	}
	// kiln.root=defer: the VM is booted to be snapshotted, and each clone
	// gets disks of its own. The block driver stays unloaded until
	// RootDisk, so no guest probes a disk (its size, its first blocks)
	// before the restore: what the template saw would be stale in every
	// clone.
	deferRoot := res.Params["kiln.root"] == "defer"
	skip := ""
	if deferRoot {
		skip = virtioBlkModule
	}
	loadModules(log, skip)
	step("modules")

	if deferRoot {
		var once sync.Once
		var rootErr error
		res.RootDisk = func() error {
			once.Do(func() { rootErr = mountRootLater(log, res.Params) })
			return rootErr
		}
	} else {
		err := waitDisk()
		step("disk_wait")
		if err != nil {
			log.Warn("no root disk, staying on the initramfs", "err", err)
		} else if err := mount(rootDevice, newRoot, "ext4", 0, ""); err != nil {
			log.Error("mounting root disk, staying on the initramfs", "err", err)
		} else if err := switchRoot(newRoot); err != nil {
			// Half-switched is unrecoverable in general; say so loudly.
			log.Error("switching root", "err", err)
		} else {
			res.SwitchedRoot = true
		}
		step("switch_root")
	}

	for _, m := range []struct{ src, dst, typ, data string }{
		{"devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"tmpfs", "/dev/shm", "tmpfs", "mode=1777"},
		{"cgroup2", cgroupRoot, "cgroup2", ""},
	} {
		flags := uintptr(unix.MS_NOSUID | unix.MS_NOEXEC)
		if m.typ == "tmpfs" || m.typ == "cgroup2" {
			flags |= unix.MS_NODEV
		}
		if err := mount(m.src, m.dst, m.typ, flags, m.data); err != nil {
			log.Warn("mounting", "dst", m.dst, "err", err)
		}
	}
	// With a private devpts instance, /dev/ptmx must point into it.
	_ = os.Remove("/dev/ptmx")
	_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	for name, target := range map[string]string{"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2"} {
		_ = os.Symlink(target, name)
	}

	if err := os.MkdirAll(workloadsCg, 0o755); err != nil {
		log.Warn("creating workload cgroup", "err", err)
	} else {
		res.CgroupDir = workloadsCg
	}

	host := res.Params["kiln.hostname"]
	if host == "" {
		host = "kiln"
	}
	_ = unix.Sethostname([]byte(host))
	step("mounts")
	if err := setupNetwork(log, res.Params); err != nil {
		log.Error("setting up network", "err", err)
	}
	step("network")
	return res
}

// virtioBlkModule is the block driver's module file (see modules.list).
const virtioBlkModule = "virtio_blk.ko"

// mountRootLater is the deferred half of Boot: the block driver, then
// /dev/vda as the root. /dev, /proc and /sys move into the new root with
// what is mounted below them (devpts, the cgroup file system), and the
// DNS configuration Boot wrote into the initramfs is written again.
func mountRootLater(log *slog.Logger, params map[string]string) error {
	t := time.Now()
	if err := loadModule(filepath.Join(modulesDir, virtioBlkModule)); err != nil {
		return fmt.Errorf("loading the block driver: %w", err)
	}
	if err := waitDisk(); err != nil {
		return err
	}
	if err := mount(rootDevice, newRoot, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mounting the root disk: %w", err)
	}
	if err := switchRoot(newRoot); err != nil {
		return fmt.Errorf("switching root: %w", err)
	}
	if hasVirtioDevice(virtioNetID) {
		if err := writeResolvConf(params["kiln.dns"]); err != nil {
			return err
		}
	}
	log.Info("root disk mounted", "elapsed", time.Since(t))
	return nil
}

func mountFlags(typ string) uintptr {
	if typ == "devtmpfs" {
		return unix.MS_NOSUID
	}
	return mountNoExec
}

func mount(src, dst, typ string, flags uintptr, data string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(src, dst, typ, flags, data); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount %s on %s: %w", typ, dst, err)
	}
	return nil
}

// kernelParams returns the key=value words of /proc/cmdline.
func kernelParams() map[string]string {
	out := map[string]string{}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return out
	}
	for _, w := range strings.Fields(string(b)) {
		if k, v, ok := strings.Cut(w, "="); ok {
			out[k] = v
		}
	}
	return out
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("finit_module: %w", err)
	}
	return nil
}

// hasVirtioDevice reports whether a virtio device of the given id exists,
// so the agent only waits for disks and NICs the VM actually has.
func hasVirtioDevice(id string) bool {
	devs, _ := filepath.Glob("/sys/bus/virtio/devices/*/device")
	for _, d := range devs {
		if b, err := os.ReadFile(d); err == nil && strings.TrimSpace(string(b)) == id {
			return true
		}
	}
	return false
}

func waitDisk() error {
	if !hasVirtioDevice(virtioBlkID) {
		return errors.New("no virtio block device")
	}
	deadline := time.Now().Add(diskWait)
	for {
		if _, err := os.Stat(rootDevice); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", rootDevice, diskWait)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// switchRoot makes dir the root, like busybox switch_root: move the API
// mounts into it, free the initramfs (it is RAM), move dir onto / and
// chroot. The agent keeps running as PID 1 from its deleted binary.
func switchRoot(dir string) error {
	for _, m := range []string{"/dev", "/proc", "/sys"} {
		dst := dir + m
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", dst, err)
		}
		if err := unix.Mount(m, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s: %w", m, err)
		}
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("chdir %s: %w", dir, err)
	}
	var rootSt unix.Stat_t
	if err := unix.Lstat("/", &rootSt); err != nil {
		return err
	}
	removeSameDevice("/", rootSt.Dev, dir)
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving %s to /: %w", dir, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// removeSameDevice deletes the tree under path that lives on device dev,
// not descending into other mounts nor into skip.
func removeSameDevice(path string, dev uint64, skip string) {
	entries, err := os.ReadDir(path)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(path, e.Name())
		if p == skip {
			continue
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil || st.Dev != dev {
			continue
		}
		if e.Type()&fs.ModeDir != 0 {
			removeSameDevice(p, dev, skip)
			_ = unix.Rmdir(p)
		} else {
			_ = unix.Unlink(p)
		}
	}
}

// writeResolvConf points the root's resolver at dns (kiln.dns), if set.
func writeResolvConf(dns string) error {
	if dns == "" {
		return nil
	}
	var b strings.Builder
	for _, s := range strings.Split(dns, ",") {
		if net.ParseIP(s) != nil {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
	}
	// Replace, not write through: resolv.conf is often a symlink.
	_ = os.MkdirAll("/etc", 0o755)
	_ = os.Remove(resolvConf)
	if err := os.WriteFile(resolvConf, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", resolvConf, err)
	}
	return nil
}

// setupNetwork brings lo up, and eth0 with kiln.ip, kiln.gw and kiln.dns
// from the kernel command line when the VM has a NIC.
func setupNetwork(log *slog.Logger, params map[string]string) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		_ = netlink.LinkSetUp(lo)
	}
	if !hasVirtioDevice(virtioNetID) {
		return nil
	}
	var eth netlink.Link
	deadline := time.Now().Add(2 * time.Second)
	for {
		var err error
		if eth, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("eth0 did not appear: %w", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if ip := params["kiln.ip"]; ip != "" {
		addr, err := netlink.ParseAddr(ip)
		if err != nil {
			return fmt.Errorf("parsing kiln.ip=%q: %w", ip, err)
		}
		if err := netlink.AddrReplace(eth, addr); err != nil {
			return fmt.Errorf("adding %s to eth0: %w", ip, err)
		}
	}
	if err := netlink.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bringing eth0 up: %w", err)
	}
	if gw := params["kiln.gw"]; gw != "" {
		ip := net.ParseIP(gw)
		if ip == nil {
			return fmt.Errorf("parsing kiln.gw=%q", gw)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: ip}); err != nil {
			return fmt.Errorf("adding default route via %s: %w", gw, err)
		}
	}
	if err := writeResolvConf(params["kiln.dns"]); err != nil {
		return err
	}
	log.Info("network up", "ip", params["kiln.ip"], "gw", params["kiln.gw"], "dns", params["kiln.dns"])
	return nil
}
