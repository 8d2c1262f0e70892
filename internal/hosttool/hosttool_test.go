//go:build linux

package hosttool

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/testenv"
)

func run(t *testing.T, s Spec) string {
	t.Helper()
	var out bytes.Buffer
	s.Stdout, s.Stderr = &out, &out
	cmd, err := Command(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v: %s", s.Path, s.Args, err, out.String())
	}
	return out.String()
}

func requireRoot(t *testing.T) {
	testenv.NeedRoot(t, "namespaces, uid switch")
}

// TestConfined checks what every host tool on a guest-written disk gets:
// another uid, no network, its own mount namespace, an empty environment,
// no_new_privs and the limits.
func TestConfined(t *testing.T) {
	requireRoot(t)
	t.Setenv("KILN_SECRET", "must-not-leak")
	hostNet, _ := os.Readlink("/proc/self/ns/net")
	hostMnt, _ := os.Readlink("/proc/self/ns/mnt")

	out := run(t, Spec{Path: "sh", Args: []string{"-c", `id -u; id -g; id -G; readlink /proc/self/ns/net; readlink /proc/self/ns/mnt; tr "\\0" "\\n" </proc/$$/environ | grep -c . ; grep NoNewPrivs /proc/self/status; grep -E "^Max (cpu time|address space|open files)" /proc/self/limits; tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d " "`}})
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 10 {
		t.Fatalf("output: %s", out)
	}
	want := []struct{ what, got, want string }{
		{"uid", lines[0], "1802108928"},
		{"gid", lines[1], "1802108928"},
		{"groups", lines[2], "1802108928"},
		{"env lines", strings.TrimSpace(lines[5]), "0"},
	}
	for _, w := range want {
		if w.got != w.want {
			t.Errorf("%s = %q, want %q\n%s", w.what, w.got, w.want, out)
		}
	}
	if lines[3] == hostNet || lines[3] == "" {
		t.Errorf("tool in the host's network namespace %s", lines[3])
	}
	if lines[4] == hostMnt || lines[4] == "" {
		t.Errorf("tool in the host's mount namespace %s", lines[4])
	}
	if !strings.Contains(out, "NoNewPrivs:\t1") {
		t.Errorf("no_new_privs not set:\n%s", out)
	}
	for _, l := range []string{"Max cpu time              300                  300", "Max address space         2147483648           2147483648", "Max open files            1024                 1024"} {
		if !strings.Contains(out, strings.Join(strings.Fields(l), " ")) && !containsFields(out, l) {
			t.Errorf("limit %q missing:\n%s", l, out)
		}
	}
	// Only loopback (down) in the new network namespace.
	if strings.TrimSpace(lines[len(lines)-1]) != "lo" {
		t.Errorf("interfaces: %q", lines[len(lines)-1])
	}
	if strings.Contains(out, "must-not-leak") {
		t.Error("kiln's environment leaked")
	}
	// Its own PID namespace and a root without the host's files.
	secret := filepath.Join(t.TempDir(), "host-file")
	os.WriteFile(secret, []byte("x"), 0o644)
	out = run(t, Spec{Path: "sh", Args: []string{"-c", `echo $$; for f in /etc/passwd /var/lib/kiln ` + secret + `; do test -e $f && echo "sees $f"; done; echo end`}})
	if out != "1\nend\n" {
		t.Errorf("pid and host files: %q", out)
	}
}

func containsFields(out, line string) bool {
	want := strings.Join(strings.Fields(line), " ")
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.Join(strings.Fields(l), " "), want) {
			return true
		}
	}
	return false
}

// TestFilesByDescriptor: a file in a folder the tool's uid cannot enter
// reaches it as /dev/fd/3 once granted, and nothing else of the folder.
func TestFilesByDescriptor(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "disk")
	if err := os.WriteFile(p, []byte("disk bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other")
	os.WriteFile(other, []byte("x"), 0o644)
	f, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := run(t, Spec{Path: "sh", Files: []*os.File{f}, Args: []string{"-c", `cat ` + FD(0) + `; echo; echo more >>` + FD(0) + `; cat ` + other + ` 2>/dev/null || echo denied`}})
	if out != "disk bytes\ndenied\n" {
		t.Fatalf("output %q", out)
	}
	if b, _ := os.ReadFile(p); string(b) != "disk bytesmore\n" {
		t.Fatalf("file %q", b)
	}
}

// TestCPULimit: a tool spinning on a crafted image is killed by the CPU
// limit, not left running.
func TestCPULimit(t *testing.T) {
	requireRoot(t)
	cmd, err := Command(context.Background(), Spec{Path: "sh", Args: []string{"-c", "while :; do :; done"}, CPU: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = cmd.Run()
	if err == nil || time.Since(start) > 30*time.Second {
		t.Fatalf("err %v after %s", err, time.Since(start))
	}
}

// TestFUSEJail: a FUSE tool's jail has /dev/fuse, an empty MountPoint and
// a /bin holding only fusermount, which is kiln's shim: run with
// _FUSE_COMMFD as libfuse 2 runs it, it sends the /dev/fuse descriptor
// kiln passed over that socket, as an unprivileged uid; run to unmount,
// it does nothing and succeeds.
func TestFUSEJail(t *testing.T) {
	requireRoot(t)
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	defer dev.Close()
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours, theirs := os.NewFile(uintptr(pair[0]), "ours"), os.NewFile(uintptr(pair[1]), "theirs")
	defer ours.Close()
	defer theirs.Close()
	out := run(t, Spec{Path: "sh", Files: []*os.File{theirs}, FUSE: dev, Args: []string{"-c",
		`id -u; ls -A /bin; ls -A ` + MountPoint + ` | wc -l; test -c /dev/fuse && echo dev; ` +
			`/bin/fusermount -u -q -z -- ` + MountPoint + ` && echo unmounted; ` +
			`_FUSE_COMMFD=3 /bin/fusermount -o rw,nosuid -- ` + MountPoint + ` && echo sent`}})
	if out != "1802108928\nfusermount\n0\ndev\nunmounted\nsent\n" {
		t.Fatalf("FUSE jail: %q", out)
	}
	b, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(pair[0], b, oob, unix.MSG_DONTWAIT)
	if err != nil {
		t.Fatalf("nothing sent: %v", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages %v, %v", msgs, err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		t.Fatalf("rights %v, %v", fds, err)
	}
	defer unix.Close(fds[0])
	var st unix.Stat_t
	if err := unix.Fstat(fds[0], &st); err != nil || unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != fuseMinor {
		t.Fatalf("received descriptor is not /dev/fuse: %+v, %v", st, err)
	}
}

// TestFusermountRefusesStrangers: without _FUSE_COMMFD and -u the shim
// refuses, and it never sends a descriptor it was not given.
func TestFusermountRefusesStrangers(t *testing.T) {
	if err := fusermount([]string{"-o", "rw", "--", "/mnt"}, ""); err == nil {
		t.Error("mount request without a socket accepted")
	}
	if err := fusermount([]string{"--", "/mnt"}, "x"); err == nil {
		t.Error("bad _FUSE_COMMFD accepted")
	}
	if _, err := inheritedFUSE(-1); err == nil {
		t.Error("found a /dev/fuse descriptor in a process that has none")
	}
}
