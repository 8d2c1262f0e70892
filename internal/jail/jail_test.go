//go:build linux

package jail

import (
	"bytes"
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
)

const testUID = 0x6b68fff0 // outside kiln's VM range

func needRoot(t *testing.T) {
	t.Helper()
	if err := Supported(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
}

func jailRoot(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "jail")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestConfined starts a shell in a jail and checks, from outside and from
// inside, every control the jail promises.
func TestConfined(t *testing.T) {
	needRoot(t)
	root := jailRoot(t)
	// A secret in a root-only directory, as kiln.db is: not in the jail,
	// and unreadable to the jail's uid even if it were.
	secretDir := t.TempDir()
	os.WriteFile(filepath.Join(secretDir, "kiln.db"), []byte("secret"), 0o600)
	out := filepath.Join(t.TempDir(), "out")
	os.Mkdir(out, 0o755)
	os.Chown(out, testUID, testUID)
	cg := fmt.Sprintf("kiln-test/jail-%d", os.Getpid())
	script := `echo uid=$(id -u) gid=$(id -g) groups=$(id -G); echo pid=$$; ls /; ` +
		`cat /proc/self/status | grep -E '^(NoNewPrivs|CapEff|CapBnd)'; echo env=$(wc -c < /proc/1/environ); ` +
		`touch /usr/x 2>/dev/null && echo usr-writable; touch /x 2>/dev/null && echo root-writable; ` +
		`echo ok > /out/w && echo out-writable; ` +
		`cat ` + secretDir + `/kiln.db 2>/dev/null && echo secret-read; ` +
		`exec env -i /bin/sleep 30` // sh adds PWD to what it passes on
	extra, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	binds := append(SystemBinds(), Bind{Src: out, Dst: "/out"})
	cmd, err := Command(context.Background(), Spec{
		Root: root, Binds: binds, Devices: []string{"/dev/null", "/dev/urandom"},
		UID: testUID, GID: testUID,
		Rlimits: Rlimits{NOFILE: 64, FSIZE: 1 << 20, NPROC: 64},
		Cgroup:  &CgroupSpec{Name: cg, MemoryBytes: 64 << 20, Pids: 32, CPUWeight: 50},
		Path:    "/bin/sh", Args: []string{"sh", "-c", script},
		ExtraFiles: []*os.File{extra},
	})
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	os.Setenv("KILN_JAIL_TEST_SECRET", "leak")
	defer os.Unsetenv("KILN_JAIL_TEST_SECRET")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		if err := RemoveCgroup(cg); err != nil {
			t.Error(err)
		}
		RemoveCgroup("kiln-test")
	}()
	// Wait until the shell has exec'd sleep: all output is written then.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		if strings.TrimSpace(string(b)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("jailed shell did not reach sleep; stdout %q stderr %q", stdout.String(), stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	o := stdout.String()
	t.Logf("inside: %s (stderr %q)", o, stderr.String())
	for _, want := range []string{
		fmt.Sprintf("uid=%d gid=%d groups=%d\n", testUID, testUID, testUID),
		"pid=1\n", "NoNewPrivs:\t1", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000",
		"env=0", "out-writable",
	} {
		if !strings.Contains(o, want) {
			t.Errorf("inside output lacks %q", want)
		}
	}
	for _, bad := range []string{"usr-writable", "root-writable", "secret-read"} {
		if strings.Contains(o, bad) {
			t.Errorf("inside output has %q", bad)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(out, "w")); string(b) != "ok\n" {
		t.Errorf("write through the rw bind: %q", b)
	}
	checkConfined(t, pid, root, testUID)
	fds, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if len(fds) != 4 {
		t.Errorf("%d descriptors open, want stdin, stdout, stderr and the one extra file", len(fds))
	}
	// The limits the cgroup holds.
	if got := readLimit(t, cg); got != 64<<20 {
		t.Errorf("memory limit %d, want %d", got, 64<<20)
	}
	// Its cgroup in every hierarchy, not only those that limit it: none
	// of this test's (a container's) holds it (see v1Hierarchies).
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.SplitN(l, ":", 3); len(f) != 3 || f[2] != "/"+cg {
			t.Errorf("jailed process in cgroup %q, want /%s in every hierarchy", l, cg)
		}
	}
}

// checkConfined checks from outside that pid runs confined in root as uid.
func checkConfined(t *testing.T, pid int, root string, uid uint32) {
	t.Helper()
	p := "/proc/" + strconv.Itoa(pid)
	for _, ns := range []string{"net", "mnt", "pid", "ipc", "uts"} {
		mine, err1 := os.Readlink("/proc/self/ns/" + ns)
		its, err2 := os.Readlink(p + "/ns/" + ns)
		if err1 != nil || err2 != nil {
			t.Fatalf("reading %s namespaces: %v %v", ns, err1, err2)
		}
		if ns == "pid" {
			its, _ = os.Readlink(p + "/ns/pid_for_children")
		}
		if mine == its {
			t.Errorf("%s namespace is the host's (%s)", ns, mine)
		}
	}
	var a, b syscall.Stat_t
	if err := syscall.Stat(p+"/root", &a); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(root, &b); err != nil {
		t.Fatal(err)
	}
	if a.Dev != b.Dev || a.Ino != b.Ino {
		t.Errorf("root is not the jail dir")
	}
	env, err := os.ReadFile(p + "/environ")
	if err != nil || len(env) != 0 {
		t.Errorf("environment %q (%v), want empty", env, err)
	}
	st, _ := os.ReadFile(p + "/status")
	for _, l := range strings.Split(string(st), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:"):
			for _, id := range f[1:4] {
				if id != strconv.Itoa(int(uid)) {
					t.Errorf("%s", l)
				}
			}
		case len(f) == 2 && f[0] == "NoNewPrivs:" && f[1] != "1":
			t.Errorf("%s", l)
		case len(f) >= 1 && f[0] == "Groups:" && len(f) > 1:
			t.Errorf("supplementary groups: %s", l)
		}
	}
}

func readLimit(t *testing.T, cg string) int64 {
	t.Helper()
	for _, d := range CgroupDirs(cg) {
		for _, f := range []string{"memory.max", "memory.limit_in_bytes"} {
			if b, err := os.ReadFile(filepath.Join(d, f)); err == nil {
				n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
				return n
			}
		}
	}
	t.Fatalf("no memory limit file for %s", cg)
	return 0
}

// TestNamedNetns: with NetNS set, the command joins that namespace.
func TestNamedNetns(t *testing.T) {
	needRoot(t)
	// The host's own namespace stands in for a VM's named one.
	cmd, err := Command(context.Background(), Spec{Root: jailRoot(t), Binds: SystemBinds(), NetNS: "/proc/1/ns/net",
		UID: testUID, GID: testUID, Path: "/bin/sleep", Args: []string{"sleep", "5"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	want, _ := os.Readlink("/proc/1/ns/net")
	var got string
	for i := 0; i < 200; i++ {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/comm"); strings.TrimSpace(string(b)) == "sleep" {
			got, _ = os.Readlink("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/net")
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got != want {
		t.Fatalf("net namespace %q, want %q", got, want)
	}
}

// TestInitFailureIsReported: a setup failure ends the command with a
// message on its stderr, not with the command running unconfined.
func TestInitFailureIsReported(t *testing.T) {
	needRoot(t)
	cmd, err := Command(context.Background(), Spec{Root: jailRoot(t), NetNS: "/nonexistent/netns",
		UID: testUID, GID: testUID, Path: "/bin/true", Args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "netns") {
		t.Fatalf("err %v, output %q", err, out)
	}
}

func TestSpecChecks(t *testing.T) {
	root := t.TempDir() // 0700: refused
	os.Chmod(root, 0o700)
	good := jailRoot(t)
	for _, s := range []Spec{
		{Root: root, UID: 1, GID: 1, Path: "/x", Args: []string{"x"}},
		{Root: "/", UID: 1, GID: 1, Path: "/x", Args: []string{"x"}},
		{Root: good, UID: 0, GID: 1, Path: "/x", Args: []string{"x"}},
		{Root: good, UID: 1, GID: 1, Path: "/x", Args: []string{"x"}, Binds: []Bind{{Src: "/usr", Dst: "/../etc"}}},
		{Root: good, UID: 1, GID: 1, Path: "/x", Args: []string{"x"}, Devices: []string{"/etc/passwd"}},
		{Root: good, UID: 1, GID: 1, Path: "/x", Args: []string{"x"}, Cgroup: &CgroupSpec{Name: "../x"}},
	} {
		if _, err := Command(context.Background(), s); err == nil {
			t.Errorf("spec %+v accepted", s)
		}
	}
}

// BenchmarkJailedTrue measures what a jail costs to start: run /bin/true
// jailed (with a cgroup) against directly.
func BenchmarkJailedTrue(b *testing.B) {
	if Supported() != nil {
		b.Skip("needs root")
	}
	root := filepath.Join(b.TempDir(), "jail")
	os.Mkdir(root, 0o755)
	b.Run("direct", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if err := exec.Command("/bin/true").Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("jailed", func(b *testing.B) {
		cg := fmt.Sprintf("kiln-test/bench-%d", os.Getpid())
		defer RemoveCgroup("kiln-test")
		defer RemoveCgroup(cg)
		for i := 0; i < b.N; i++ {
			cmd, err := Command(context.Background(), Spec{Root: root, Binds: SystemBinds(), Devices: []string{"/dev/null"},
				UID: testUID, GID: testUID, Cgroup: &CgroupSpec{Name: cg, MemoryBytes: 64 << 20},
				Path: "/bin/true", Args: []string{"true"}})
			if err != nil {
				b.Fatal(err)
			}
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatal(err, string(out))
			}
		}
	})
}
