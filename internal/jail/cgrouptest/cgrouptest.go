//go:build linux

// Package cgrouptest gives tests a cgroup v2 hierarchy arranged as on a
// Kubernetes node with cgroup v2: mounted with nsdelegate, with "pod"
// cgroups whose processes are killed as a runtime kills a container's.
package cgrouptest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// MountCgroup2 mounts the v2 hierarchy at a temporary directory with
// nsdelegate (what systemd mounts it with, and what makes a cgroup
// namespace a boundary). The hierarchy's options are global: it is
// mounted with the host's other options kept, and remounted with the
// host's own when the test ends.
func MountCgroup2(t *testing.T) string {
	t.Helper()
	orig := cgroup2Options()
	with := orig
	if !strings.Contains(","+orig+",", ",nsdelegate,") {
		with = strings.Trim(orig+",nsdelegate", ",")
	}
	dir := t.TempDir()
	if err := unix.Mount("none", dir, "cgroup2", 0, with); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mounting cgroup2 at %s (-o %s): %v", dir, with, err)
		}
		t.Skipf("mounting cgroup2: %v", err)
	}
	t.Cleanup(func() {
		if with != orig {
			if err := unix.Mount("none", dir, "cgroup2", unix.MS_REMOUNT, orig); err != nil {
				t.Errorf("restoring the cgroup2 options %q: %v", orig, err)
			}
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Error(err)
		}
	})
	return dir
}

// cgroup2Options are the hierarchy-wide options of the host's cgroup2
// mount ("" if none is mounted), without the per-mount ones.
func cgroup2Options() string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		_, after, ok := strings.Cut(l, " - cgroup2 ")
		if !ok {
			continue
		}
		f := strings.Fields(after)
		if len(f) < 2 {
			continue
		}
		var keep []string
		for _, o := range strings.Split(f[1], ",") {
			if o != "rw" && o != "ro" && o != "seclabel" {
				keep = append(keep, o)
			}
		}
		return strings.Join(keep, ",")
	}
	return ""
}

// Pod makes a new "pod" cgroup in the hierarchy at mnt and returns its
// directory; when the test ends, what is left in it is killed and it is
// removed.
func Pod(t *testing.T, mnt string) string {
	t.Helper()
	dir := filepath.Join(mnt, fmt.Sprintf("kt-pod-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		Kill(t, dir)
		os.Remove(dir)
	})
	return dir
}

// Kill kills everything in the cgroup dir (cgroup.kill where the kernel
// has it, else each process) and waits until it is empty, as a runtime
// stops a container.
func Kill(t *testing.T, dir string) {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		for _, p := range strings.Fields(string(procs)) {
			if pid, err := strconv.Atoi(p); err == nil {
				unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ev, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
		if err != nil || strings.Contains(string(ev), "populated 0") {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("processes left in %s", dir)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
