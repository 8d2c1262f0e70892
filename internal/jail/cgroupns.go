//go:build linux

package jail

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// A kiln in a container (the node Pod) may sit in a cgroup namespace of
// its own, rooted at the container's cgroup: containerd and CRI-O give
// one to every unprivileged container on cgroup v2 hosts. The cgroup a
// jailed QEMU must live in (kiln/ID.* at the host's root, so that it
// outlives the Pod) is then outside that namespace, and when the v2
// hierarchy is mounted with nsdelegate (systemd's default) the kernel
// refuses to move a process there from inside it: cgroup.procs answers
// ENOENT (cgroup_procs_write_permission). The jail's init therefore
// enters the host's cgroup namespace before it opens cgroup.procs (the
// kernel checks the namespace the file was opened in), and the cgroup
// paths come from the host's cgroup file system mounted into the
// container (Config.CgroupRoot).

// Config says where the jail finds the host's cgroups. Empty fields keep
// the defaults.
type Config struct {
	// CgroupRoot is where the host's cgroup file system is mounted: the
	// v2 hierarchy, or the tmpfs holding the v1 hierarchies. Default
	// /sys/fs/cgroup; in a container with a cgroup namespace of its own
	// that is the container's subtree, so mount the host's elsewhere
	// (deploy/kubernetes: /host/sys/fs/cgroup) and name it here.
	CgroupRoot string
	// HostCgroupNS is a file of the host's cgroup namespace, entered when
	// this process is in another one. Default /proc/1/ns/cgroup, which is
	// the host's when kiln shares the host's PID namespace (hostPID);
	// "none" never enters one.
	HostCgroupNS string
}

// DefaultHostCgroupNS is the host init's cgroup namespace.
const DefaultHostCgroupNS = "/proc/1/ns/cgroup"

var (
	hostCgroupNS = DefaultHostCgroupNS
	nsOnce       sync.Once
	nsEnter      string
	nsErr        error
)

// Configure sets where the host's cgroups are. Call it before the first
// jailed command starts: what it changes is looked up once.
func Configure(c Config) error {
	root, ns := cgroupRoot, hostCgroupNS
	if c.CgroupRoot != "" {
		if !filepath.IsAbs(c.CgroupRoot) || !isCgroupFS(c.CgroupRoot) && !dirExists(filepath.Join(c.CgroupRoot, "memory")) {
			return fmt.Errorf("jail: cgroup root %q is neither a cgroup file system nor a directory of cgroup v1 hierarchies: mount the host's /sys/fs/cgroup there: %w", c.CgroupRoot, errdefs.ErrInvalid)
		}
		root = filepath.Clean(c.CgroupRoot)
	}
	switch c.HostCgroupNS {
	case "":
	case "none":
		ns = ""
	default:
		if !filepath.IsAbs(c.HostCgroupNS) {
			return fmt.Errorf("jail: host cgroup namespace %q: want an absolute path such as %s, or none: %w", c.HostCgroupNS, DefaultHostCgroupNS, errdefs.ErrInvalid)
		}
		ns = c.HostCgroupNS
	}
	if root == cgroupRoot && ns == hostCgroupNS {
		return nil // nothing to look up again (several engines in one test process)
	}
	cgroupRoot, hostCgroupNS = root, ns
	versionOnce, v1Once, nsOnce = sync.Once{}, sync.Once{}, sync.Once{}
	version, limits, v1Dirs = "", false, nil
	return nil
}

// CheckCgroupPlacement says why jailed commands could not be placed in
// cgroups outside this process's cgroup namespace (nil when they can, or
// when no namespace is in the way), so that a kiln node refuses to start
// rather than fail every VM start.
func CheckCgroupPlacement() error {
	_, err := cgroupNSToEnter()
	return err
}

// cgroupNSToEnter is the cgroup namespace the jail's init must enter
// before joining its cgroup ("" for none), or why the cgroup cannot be
// placed outside this process's namespace.
func cgroupNSToEnter() (string, error) {
	nsOnce.Do(func() { nsEnter, nsErr = findCgroupNS() })
	return nsEnter, nsErr
}

func findCgroupNS() (string, error) {
	if hostCgroupNS == "" || CgroupVersion() == "v1" {
		// v1 hierarchies make no namespace a delegation boundary, and
		// runtimes give v1 containers the host's namespace.
		return "", nil
	}
	own, err := nsID("/proc/self/ns/cgroup")
	if err != nil {
		return "", nil // a kernel without cgroup namespaces: nothing to leave
	}
	host, err := nsID(hostCgroupNS)
	if err == nil && host != own {
		if root, ok := mountRoot(cgroupRoot); ok && root == "/" {
			return "", fmt.Errorf("jail: %s is this container's own cgroup tree (its cgroup namespace's root), so cgroups made there die with the container: "+
				"mount the host's /sys/fs/cgroup elsewhere (hostPath, e.g. /host/sys/fs/cgroup) and pass that as --cgroup-root: %w", cgroupRoot, errdefs.ErrUnavailable)
		}
		return hostCgroupNS, nil
	}
	if privateCgroupNS() {
		why := "is this process's own"
		if err != nil {
			why = "cannot be read (" + err.Error() + ")"
		}
		return "", fmt.Errorf("jail: kiln runs in a cgroup namespace of its own and cannot leave it: %s %s, not the host's: "+
			"run kiln with the host's PID namespace (Kubernetes: hostPID: true) or pass --host-cgroupns naming a process of the host's: %w", hostCgroupNS, why, errdefs.ErrUnavailable)
	}
	return "", nil
}

type nsKey struct{ dev, ino uint64 }

func nsID(path string) (nsKey, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsKey{}, err
	}
	return nsKey{st.Dev, st.Ino}, nil
}

// privateCgroupNS says whether this process evidently is in a cgroup
// namespace other than the one cgroupRoot shows: it sees itself at the
// root ("0::/") of the v2 hierarchy, yet the root of cgroupRoot does not
// hold it.
func privateCgroupNS() bool {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil || !strings.Contains("\n"+string(b), "\n0::/\n") {
		return false
	}
	procs, err := os.ReadFile(filepath.Join(cgroupRoot, "cgroup.procs"))
	if err != nil {
		return false
	}
	return !containsPID(string(procs), os.Getpid())
}

func containsPID(procs string, pid int) bool {
	for _, f := range strings.Fields(procs) {
		if f == fmt.Sprint(pid) {
			return true
		}
	}
	return false
}

// mountRoot is the root (the 4th field of /proc/self/mountinfo) of the
// cgroup mount at dir. The kernel shows it relative to this process's
// cgroup namespace: "/" for the namespace's own root, "/.." steps for a
// mount of a cgroup above it.
func mountRoot(dir string) (string, bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	root, found := "", false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE OPTS
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[4] != dir {
			continue
		}
		for i, x := range fields {
			if x == "-" && i+1 < len(fields) && strings.HasPrefix(fields[i+1], "cgroup") {
				root, found = fields[3], true // the last mount on dir wins
			}
		}
	}
	return root, found
}

// errCgroupNSRefused explains the kernel's ENOENT on cgroup.procs of a
// cgroup that exists: the writer's cgroup namespace does not contain it.
func errCgroupNSRefused(dir string, err error) error {
	if !errors.Is(err, unix.ENOENT) || !dirExists(dir) {
		return err
	}
	return fmt.Errorf("%w: the kernel refuses to move a process to a cgroup outside the cgroup namespace it is in "+
		"(the v2 hierarchy is mounted with nsdelegate): kiln must enter the host's cgroup namespace: "+
		"run it with the host's PID namespace (Kubernetes: hostPID: true) so that %s is the host's, or pass --host-cgroupns", err, DefaultHostCgroupNS)
}
