//go:build linux

package guest

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// DefaultCapabilities is the capability set of a workload started with
// proto.CapsDefault (an app whose image does not ask for
// additionalOsCapabilities ALL).
//
// AWS says only that a MicroVM image gets "additional OS capabilities"
// with ALL and none otherwise (API reference, MicrovmImage
// additionalOsCapabilities; SAM: "If you don't specify a value, the
// service grants no additional OS capabilities"); it does not list the
// default set. So kiln uses the container runtimes' default: Podman's
// (containers.conf default_capabilities), which is Docker's default
// (moby oci/caps/defaults.go) without NET_RAW, MKNOD and AUDIT_WRITE.
// Without NET_RAW an app cannot forge packets on its VM's link; without
// SYS_ADMIN it cannot mount, load BPF or make namespaces.
var DefaultCapabilities = []uintptr{
	unix.CAP_CHOWN,
	unix.CAP_DAC_OVERRIDE,
	unix.CAP_FOWNER,
	unix.CAP_FSETID,
	unix.CAP_KILL,
	unix.CAP_NET_BIND_SERVICE,
	unix.CAP_SETFCAP,
	unix.CAP_SETGID,
	unix.CAP_SETPCAP,
	unix.CAP_SETUID,
	unix.CAP_SYS_CHROOT,
}

// CapExecArg0 is argv[0] of the agent re-executed to start a workload
// with restricted capabilities (see MaybeCapExec). Go's os/exec cannot
// shrink the bounding set between fork and exec, so the agent runs
// itself, still as root: it drops what the set does not hold, takes the
// workload's ids, and execs the workload in the same process.
const CapExecArg0 = "kiln-agent-capexec"

// capExecCmd rewrites a prepared command to go through the capexec step
// when req asks for restricted capabilities. The credentials move from
// SysProcAttr into the arguments: the step must start as root to drop
// capabilities, then becomes the workload's user.
func capExecCmd(path string, req proto.ExecRequest, attr *syscall.SysProcAttr) (string, []string, error) {
	switch req.Caps {
	case "", proto.CapsAll:
		return path, req.Argv, nil
	case proto.CapsDefault:
	default:
		return "", nil, fmt.Errorf("unknown capability set %q", req.Caps)
	}
	if os.Getuid() != 0 {
		return "", nil, fmt.Errorf("capability set %q needs the agent to run as root", req.Caps)
	}
	uid, gid, groups := "0", "0", ""
	if c := attr.Credential; c != nil {
		uid, gid = strconv.FormatUint(uint64(c.Uid), 10), strconv.FormatUint(uint64(c.Gid), 10)
		gs := make([]string, len(c.Groups))
		for i, g := range c.Groups {
			gs[i] = strconv.FormatUint(uint64(g), 10)
		}
		groups = strings.Join(gs, ",")
		attr.Credential = nil
	}
	args := append([]string{CapExecArg0, req.Caps, uid, gid, groups, path}, req.Argv...)
	return "/proc/self/exe", args, nil
}

// MaybeCapExec is the capexec step: when argv[0] is CapExecArg0 it
// restricts this process and execs the workload, never returning;
// otherwise it returns at once. kiln-agent's main calls it first.
func MaybeCapExec() {
	if len(os.Args) < 7 || os.Args[0] != CapExecArg0 {
		return
	}
	if err := capExec(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-agent: starting the workload: %v\n", err)
		os.Exit(127)
	}
}

func capExec(a []string) error {
	// The bounding and the other capability sets belong to a thread:
	// drop them on the thread that execs.
	runtime.LockOSThread()
	set, path, argv := a[0], a[4], a[5:]
	if set != proto.CapsDefault {
		return fmt.Errorf("unknown capability set %q", set)
	}
	uid, err := strconv.ParseUint(a[1], 10, 32)
	if err != nil {
		return fmt.Errorf("uid %q: %w", a[1], err)
	}
	gid, err := strconv.ParseUint(a[2], 10, 32)
	if err != nil {
		return fmt.Errorf("gid %q: %w", a[2], err)
	}
	var groups []int
	for _, g := range strings.Split(a[3], ",") {
		if g == "" {
			continue
		}
		n, err := strconv.ParseUint(g, 10, 32)
		if err != nil {
			return fmt.Errorf("group %q: %w", g, err)
		}
		groups = append(groups, int(n))
	}
	if err := restrictCapabilities(DefaultCapabilities); err != nil {
		return err
	}
	// Go applies set*id to every thread of the process.
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(int(gid), int(gid), int(gid)); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(int(uid), int(uid), int(uid)); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	return syscall.Exec(path, argv, os.Environ())
}

// restrictCapabilities drops every capability not in keep from the
// bounding set (so no later exec, setuid binary or file capability can
// regain it) and empties the inheritable and ambient sets, as runc does
// for a container's default process. Root then execs with permitted =
// effective = keep; any other user with none, as in Docker.
func restrictCapabilities(keep []uintptr) error {
	kept := map[uintptr]bool{}
	for _, c := range keep {
		kept[c] = true
	}
	for c := uintptr(0); c <= unix.CAP_LAST_CAP; c++ {
		if kept[c] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && err != unix.EINVAL {
		return fmt.Errorf("clearing ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	var mask [2]uint32
	for _, c := range keep {
		mask[c/32] |= 1 << (c % 32)
	}
	for i := range data {
		data[i].Permitted &= mask[i]
		data[i].Effective &= mask[i]
		data[i].Inheritable = 0
	}
	// setresuid below still needs CAP_SETUID/SETGID, both in keep.
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return nil
}
