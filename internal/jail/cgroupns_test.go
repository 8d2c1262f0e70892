//go:build linux

package jail

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/jail/cgrouptest"
)

// The helper of TestCgroupOutsidePodNamespace: this test binary stands
// in for a kiln node in a Pod (KILN_JAIL_TEST_HELPER=unshare: enter a new
// cgroup namespace rooted at the cgroup it was started in, then exec
// itself whole into it as "pod").
func TestMain(m *testing.M) {
	switch os.Getenv("KILN_JAIL_TEST_HELPER") {
	case "unshare":
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
			fmt.Println("ERR unshare:", err)
			os.Exit(1)
		}
		os.Setenv("KILN_JAIL_TEST_HELPER", "pod")
		err := syscall.Exec("/proc/self/exe", os.Args, os.Environ())
		fmt.Println("ERR exec:", err)
		os.Exit(1)
	case "pod":
		podHelper()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// podHelper starts a jailed sleep in cgroup $KILN_TEST_CGROUP and says on
// stdout how it went: "JAILED PID" (then waits to be killed with its
// Pod), "FAILED stderr" when the jail's init could not set up, "ERR why"
// when jail.Command refused.
func podHelper() {
	own, _ := os.ReadFile("/proc/self/cgroup")
	for _, l := range strings.Split(string(own), "\n") {
		if strings.HasPrefix(l, "0::") {
			fmt.Println("CGROUP", l)
		}
	}
	if own := os.Getenv("KILN_TEST_MOUNT_OWN"); own != "" {
		// What a runtime mounts at a container's /sys/fs/cgroup: the
		// hierarchy as its cgroup namespace shows it.
		if err := unix.Mount("none", own, "cgroup2", 0, ""); err != nil {
			fmt.Println("ERR mount:", err)
			return
		}
	}
	if err := Configure(Config{CgroupRoot: os.Getenv("KILN_TEST_CGROUP_ROOT"), HostCgroupNS: os.Getenv("KILN_TEST_HOST_CGROUPNS")}); err != nil {
		fmt.Println("ERR", err)
		return
	}
	cmd, err := Command(context.Background(), Spec{Root: os.Getenv("KILN_TEST_JAIL_ROOT"), Binds: SystemBinds(),
		UID: testUID, GID: testUID, Cgroup: &CgroupSpec{Name: os.Getenv("KILN_TEST_CGROUP"), MemoryBytes: 64 << 20, Pids: 16},
		Path: "/bin/sleep", Args: []string{"sleep", "120"}})
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		fmt.Println("ERR", err)
		return
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	for {
		select {
		case <-done:
			fmt.Println("FAILED", strings.TrimSpace(stderr.String()))
			return
		case <-time.After(10 * time.Millisecond):
		}
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid)); strings.TrimSpace(string(b)) == "sleep" {
			fmt.Println("JAILED", cmd.Process.Pid)
			<-done
			return
		}
	}
}

// TestCgroupOutsidePodNamespace: a kiln in a cgroup namespace of its own
// (a Pod's on a cgroup v2 host) puts a jailed process into a cgroup
// outside that namespace, and the process survives when everything in
// the Pod's cgroup is killed. Real kernel parts throughout: a cgroup2
// mount with nsdelegate, a "pod" cgroup, a helper kiln started in it and
// in a new cgroup namespace rooted there, a real jail.Command child.
// Without entering the host's namespace the kernel refuses the move, and
// with no way to enter it jail.Command says what the operator must do.
func TestCgroupOutsidePodNamespace(t *testing.T) {
	needRoot(t)
	mnt := cgrouptest.MountCgroup2(t)
	// Orphans of the killed helper come back here to be reaped.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	self := fmt.Sprintf("/proc/%d/ns/cgroup", os.Getpid())

	t.Run("refused without the host's namespace", func(t *testing.T) {
		res := runInPod(t, mnt, mnt, "none")
		if !strings.HasPrefix(res.outcome, "FAILED") || !strings.Contains(res.outcome, "no such file or directory") ||
			!strings.Contains(res.outcome, "hostPID") {
			t.Fatalf("the jail joined a cgroup outside its Pod's namespace without entering the host's (nsdelegate should refuse): %q", res.outcome)
		}
	})
	t.Run("no host namespace to enter", func(t *testing.T) {
		// The Pod's own namespace named as the host's: what /proc/1 is
		// without hostPID.
		res := runInPod(t, mnt, mnt, "/proc/self/ns/cgroup")
		if !strings.HasPrefix(res.outcome, "ERR") || !strings.Contains(res.outcome, "hostPID: true") {
			t.Fatalf("jail.Command did not refuse with what the operator must do: %q", res.outcome)
		}
	})
	t.Run("the pod's own cgroup tree as the root", func(t *testing.T) {
		own := t.TempDir()
		t.Cleanup(func() { unix.Unmount(own, unix.MNT_DETACH) }) // the helper's mount, before the TempDir goes
		res := runInPod(t, mnt, own, self, "KILN_TEST_MOUNT_OWN="+own)
		if !strings.HasPrefix(res.outcome, "ERR") || !strings.Contains(res.outcome, "own cgroup tree") {
			t.Fatalf("jail.Command did not refuse a cgroup root inside the pod: %q", res.outcome)
		}
	})
	t.Run("entering the host's namespace", func(t *testing.T) {
		res := runInPod(t, mnt, mnt, self)
		pid, err := strconv.Atoi(strings.TrimPrefix(res.outcome, "JAILED "))
		if err != nil {
			t.Fatalf("no jailed process: %q", res.outcome)
		}
		defer func() {
			unix.Kill(pid, unix.SIGKILL)
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, 0, nil)
		}()
		// The Pod stops: everything in its cgroup is killed.
		cgrouptest.Kill(t, res.pod)
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(b)) != "sleep" {
			t.Fatalf("the jailed process died with its Pod (comm %q)", b)
		}
		procs, _ := os.ReadFile(filepath.Join(mnt, res.cgroup, "cgroup.procs"))
		if !containsPID(string(procs), pid) {
			t.Errorf("the jailed process %d is not in %s (cgroup.procs %q)", pid, res.cgroup, procs)
		}
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if !strings.Contains("\n"+string(b), "\n0::/"+res.cgroup+"\n") {
			t.Errorf("the jailed process's cgroups:\n%s\nwant 0::/%s", b, res.cgroup)
		}
	})
}

type podRun struct {
	outcome string // the helper's JAILED, FAILED or ERR line
	pod     string // the pod cgroup's directory
	cgroup  string // the jail's cgroup, relative to the mount
}

// runInPod starts the helper kiln in a new pod cgroup of mnt and a cgroup
// namespace rooted there, with cgroupRoot and hostNS as its
// --cgroup-root and --host-cgroupns, and returns what became of its
// jailed command.
func runInPod(t *testing.T, mnt, cgroupRoot, hostNS string, env ...string) podRun {
	t.Helper()
	r := podRun{cgroup: fmt.Sprintf("kiln-test/ns-%d", os.Getpid())}
	t.Cleanup(func() { // after the pod's (cleanups run last first): the jailed process is gone by then
		os.Remove(filepath.Join(cgroupRoot, r.cgroup))
		os.Remove(filepath.Dir(filepath.Join(cgroupRoot, r.cgroup)))
	})
	r.pod = cgrouptest.Pod(t, mnt)
	pod, err := os.Open(r.pod)
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "KILN_JAIL_TEST_HELPER=unshare", "KILN_TEST_CGROUP_ROOT="+cgroupRoot,
		"KILN_TEST_HOST_CGROUPNS="+hostNS, "KILN_TEST_CGROUP="+r.cgroup, "KILN_TEST_JAIL_ROOT="+jailRoot(t))
	cmd.Env = append(cmd.Env, env...)
	// Born in the pod cgroup, as a runtime starts a container's process.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(pod.Fd())}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 16) // the helper says a few lines at most
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("the helper ended without saying how its jail went")
			}
			if l == "CGROUP 0::/" {
				continue // it sees its pod cgroup as its namespace's root
			}
			if strings.HasPrefix(l, "CGROUP") {
				t.Fatalf("the helper is not at the root of a cgroup namespace of its own: %s", l)
			}
			t.Logf("helper (host cgroupns %s): %s", hostNS, l)
			r.outcome = l
			return r
		case <-timeout:
			t.Fatal("the helper said nothing for 20 s")
		}
	}
}

// TestConfigureRefuses: a cgroup root that is no cgroup file system, or
// relative paths, are refused before anything is looked up.
func TestConfigureRefuses(t *testing.T) {
	for _, c := range []Config{
		{CgroupRoot: "sys/fs/cgroup"},
		{CgroupRoot: t.TempDir()},
		{HostCgroupNS: "proc/1/ns/cgroup"},
	} {
		if err := Configure(c); err == nil {
			t.Errorf("Configure(%+v) accepted", c)
		}
	}
}
