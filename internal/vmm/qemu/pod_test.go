//go:build linux

package qemu

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/jail/cgrouptest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// TestQEMUOutlivesItsPod: QEMU lives outside the lifetime of the kiln
// that started it, as `kiln node` in a Kubernetes Pod needs
// (deploy/kubernetes/base/node.yaml). A kiln (this test binary as a
// helper) is started inside a cgroup of its own in every mounted cgroup
// hierarchy, as a container runtime starts a Pod's container, and boots
// a VM; then everything in that cgroup is killed, as the runtime does
// when the Pod stops. QEMU is in cgroups of its own (kiln/ID.*) in every
// hierarchy, so it survives, and a new driver adopts it, as the next node
// Pod does.
//
// What this does not show: the Pod's PID namespace (the DaemonSet uses
// hostPID, so there is none) and a container's private cgroup namespace
// on cgroup v2 hosts (docs/CLUSTER.md).
func TestQEMUOutlivesItsPod(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up")
	}
	// The "Pod's" cgroup in every hierarchy, as the runtime makes it.
	pod := "kt-pod-" + strconv.Itoa(os.Getpid())
	var podDirs, procs []string
	for _, h := range cgroupMounts(t) {
		d := filepath.Join(h, pod)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		podDirs = append(podDirs, d)
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				os.WriteFile(filepath.Join(d, f), b, 0)
			}
		}
		procs = append(procs, filepath.Join(d, "cgroup.procs"))
	}
	defer func() {
		killCgroups(t, podDirs)
		for _, d := range podDirs {
			os.Remove(d)
		}
	}()

	dataDir := shortDir(t)
	cmd, out := startHelperKiln(t, "boot-one-and-hang", dataDir, procs...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the helper kiln's output:\n%s", out)
		}
	})
	testenv.WaitFor(t, 120*time.Second, func() bool { return strings.Contains(out.String(), "READY") }, "the helper kiln in its pod cgroup to boot its VM")
	// The helper really ran in the pod's cgroups.
	if b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup"); strings.Count(string(b), "/"+pod+"\n") != len(podDirs) {
		t.Fatalf("the helper kiln is not in the pod cgroup %s in every hierarchy:\n%s", pod, b)
	}
	// The Pod stops: everything in its cgroups is killed.
	killCgroups(t, podDirs)
	cmd.Wait()

	d := newDriver(t, dataDir)
	rep, err := d.Recover(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Adopted) != 1 || rep.Adopted[0] != "keep" {
		t.Fatalf("adopted %v, want [keep]: QEMU died with its kiln's pod cgroup (output: %s)", rep.Adopted, out)
	}
	info, err := d.Inspect(context.Background(), "keep")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(info.PID) + "/cgroup")
	want := "/" + d.cgroupName("keep")
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.SplitN(l, ":", 3); len(f) != 3 || f[2] != want {
			t.Errorf("QEMU's cgroup %q, want %s in every hierarchy", l, want)
		}
	}
	if got := mustSh(t, d, "keep", "cat /root/mark"); got != "before-crash" {
		t.Errorf("the VM that outlived its kiln lost its disk: %q", got)
	}
	if err := d.Terminate(context.Background(), "keep"); err != nil {
		t.Fatal(err)
	}
	assertNoQEMU(t, d)
}

// TestQEMUOutlivesItsPodCgroupNS: the same on cgroup v2 with the Pod's
// own cgroup namespace, the case a cgroup v1 host cannot show. The v2
// hierarchy is mounted with nsdelegate at a temporary directory; a helper
// kiln is born in a "pod" cgroup there and in a new cgroup namespace
// rooted at it (unshare --cgroup), with --cgroup-root at the mount and the
// test's namespace as the host's (/proc/1 stands for it under hostPID; on
// this machine it cannot be read). It boots a VM; the pod's cgroup is
// killed; a second helper kiln in a second such pod adopts the VM, reads
// its disk and terminates it. First, a helper that does not enter the
// host's namespace (--host-cgroupns none) cannot start QEMU: the kernel
// refuses the move. Where the v2 hierarchy has no memory
// controller (this machine: all are bound to v1) QEMU's cgroup carries no
// limits.
func TestQEMUOutlivesItsPodCgroupNS(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	mnt := cgrouptest.MountCgroup2(t)
	place := func() helperPlace {
		return helperPlace{cgroupProcs: []string{filepath.Join(cgrouptest.Pod(t, mnt), "cgroup.procs")}, cgroupNS: true,
			env: []string{"KILN_TEST_CGROUP_ROOT=" + mnt, "KILN_TEST_HOST_CGROUPNS=" + fmt.Sprintf("/proc/%d/ns/cgroup", os.Getpid())}}
	}
	// Without entering the host's namespace the kernel refuses the move,
	// and the VM does not start.
	refused := place()
	refused.env[1] = "KILN_TEST_HOST_CGROUPNS=none"
	cmd0, out0 := startHelperKilnIn(t, "boot-one-and-hang", shortDir(t), refused)
	cmd0.Wait()
	if o := out0.String(); !strings.Contains(o, "helper: booting keep") || !strings.Contains(o, "no such file or directory") || !strings.Contains(o, "nsdelegate") {
		t.Fatalf("a kiln that stays in its pod's cgroup namespace booted a VM, or failed otherwise: %s", o)
	}

	dataDir := shortDir(t)
	first := place()
	cmd, out := startHelperKilnIn(t, "boot-one-and-hang", dataDir, first)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the first helper kiln's output:\n%s", out)
		}
	})
	// "helper:" is a failure it reports before it ends.
	testenv.WaitFor(t, 120*time.Second, func() bool {
		return strings.Contains(out.String(), "READY") || strings.Contains(out.String(), "helper:")
	},
		"the helper kiln in its pod's cgroup namespace to boot its VM")
	if !strings.Contains(out.String(), "READY") {
		t.Fatal("the helper kiln could not boot its VM")
	}
	if b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup"); !strings.Contains(string(b), "0::/kt-pod-") {
		t.Fatalf("the helper kiln is not in its pod cgroup:\n%s", b)
	}
	// Only this data dir's: a stopped run may have left another's.
	keep := "keep." + CgroupSuffix(dataDir)
	qemus, _ := filepath.Glob(filepath.Join(mnt, cgroupParent, keep, "cgroup.procs"))
	if len(qemus) != 1 {
		t.Fatalf("no cgroup %s/%s under the mount: %v", cgroupParent, keep, qemus)
	}
	t.Cleanup(func() { os.Remove(filepath.Dir(qemus[0])); os.Remove(filepath.Join(mnt, cgroupParent)) })
	// The Pod stops.
	cgrouptest.Kill(t, filepath.Dir(first.cgroupProcs[0]))
	cmd.Wait()
	if b, _ := os.ReadFile(qemus[0]); len(strings.Fields(string(b))) == 0 {
		t.Fatalf("QEMU died with its kiln's pod (output: %s)", out)
	}

	cmd2, out2 := startHelperKilnIn(t, "adopt-and-terminate", dataDir, place())
	cmd2.Wait()
	o := out2.String()
	t.Logf("the next helper kiln: %s", o)
	for _, want := range []string{"ADOPTED [keep] <nil>", `MARK "before-crash" <nil>`, "TERMINATED <nil>"} {
		if !strings.Contains(o, want) {
			t.Errorf("the next kiln's output lacks %q", want)
		}
	}
}

// cgroupMounts are the mount points of every cgroup hierarchy (v1 and v2)
// under /sys/fs/cgroup.
func cgroupMounts(t *testing.T) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE OPTS
		fields := strings.Fields(sc.Text())
		for i, x := range fields {
			if x == "-" && i+1 < len(fields) && len(fields) > 4 && (fields[i+1] == "cgroup" || fields[i+1] == "cgroup2") &&
				strings.HasPrefix(fields[4], "/sys/fs/cgroup") {
				out = append(out, fields[4])
			}
		}
	}
	if len(out) == 0 {
		t.Skip("no cgroup hierarchy mounted")
	}
	return out
}

// killCgroups SIGKILLs every process in dirs until they are empty.
func killCgroups(t *testing.T, dirs []string) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		alive := 0
		for _, d := range dirs {
			b, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			for _, p := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(p); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
					alive++
				}
			}
		}
		if alive == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("processes left in %v", dirs)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
