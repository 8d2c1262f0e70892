//go:build linux

package soakbench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// need skips (fails in CI) unless the host can run real VMs as root.
func need(t *testing.T, tools ...string) {
	t.Helper()
	if testenv.Short() {
		t.Skip("-short: the soak needs root and VMs")
	}
	missing := func(why string) {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI this test must run, but %s", why)
		}
		t.Skip(why)
	}
	if os.Geteuid() != 0 {
		missing("needs root (network namespaces, cgroups, mounts)")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing(tool + " not found: run `make setup`")
		}
	}
}

func kernelDir(t *testing.T) string {
	d := os.Getenv("KILN_DATA_DIR")
	if d == "" {
		d = "/var/lib/kiln"
	}
	k := filepath.Join(d, "kernel")
	if _, err := os.Stat(filepath.Join(k, "vmlinuz")); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI the soak must run, but there is no guest kernel in %s", k)
		}
		t.Skip("no guest kernel: run `make setup`")
	}
	return k
}

// TestSoakShort is the CI soak: a few cycles against a real server killed
// at seeded random points; any leak, stuck or lost record fails it.
// KILN_SOAK_CYCLES and KILN_SOAK_SEED change the run.
func TestSoakShort(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "ip", "nft", "busybox")
	kdir := kernelDir(t)
	cycles := 6
	if v, err := strconv.Atoi(os.Getenv("KILN_SOAK_CYCLES")); err == nil && v > 0 {
		cycles = v
	}
	seed := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("KILN_SOAK_SEED"), 10, 64); err == nil {
		seed = v
	}
	t.Logf("soak seed %d (KILN_SOAK_SEED=%d reruns it)", seed, seed)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	bin := t.TempDir()
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{
		{filepath.Join(bin, "kiln"), "./cmd/kiln", false},
		// The server finds the guest agent next to its own binary.
		{filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true},
	} {
		args := []string{"build", "-o", b.out}
		if b.static {
			args = append(args, "-trimpath", "-ldflags=-s -w")
		}
		cmd := exec.CommandContext(ctx, "go", append(args, b.pkg)...)
		cmd.Dir = filepath.Join("..", "..")
		cmd.Env = os.Environ()
		if b.static {
			cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	res, err := Run(ctx, Options{Kiln: filepath.Join(bin, "kiln"), KernelDir: kdir, Cycles: cycles, Concurrency: 2,
		Seed: seed, KillAfter: 6 * time.Second, Progress: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(res, "", "  ")
	t.Logf("soak result:\n%s", b)
	if !res.OK() {
		t.Errorf("soak left something behind or lost track of a record (seed %d)", seed)
	}
	if res.CyclesCompleted != cycles {
		t.Errorf("%d of %d cycles completed: %v", res.CyclesCompleted, cycles, res.CycleErrors)
	}
	if res.Kills == 0 {
		t.Errorf("the server was never killed")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestCountLeaksIsExact plants one of each thing the soak counts for a
// VM of a data directory (a QEMU naming it, a network namespace with its
// TAP and nftables table, a host link, a cgroup, a mount, a VM directory
// an image directory of no version and a temporary file) and the same things for a VM of another data
// directory: each of the first must count exactly once, none of the
// second, and nothing once they are gone.
func TestCountLeaksIsExact(t *testing.T) {
	need(t, "qemu-system-x86_64", "ip", "nft")
	ctx := context.Background()
	data, other := t.TempDir(), t.TempDir()
	id, otherID := "mvm-"+randHex(t), "mvm-"+randHex(t)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	plant := func(dir, id string) func() {
		ns := netns.NSPrefix + id
		run("ip", "netns", "add", ns)
		run("ip", "netns", "exec", ns, "ip", "tuntap", "add", netns.TapName, "mode", "tap")
		run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", netns.TableName)
		// A host link as Setup makes it, alias included: other kilns on
		// the host remove a kv* veth without one.
		run("ip", "link", "add", netns.HostLinkName(id), "alias", "kiln:"+id, "type", "veth", "peer", "name", netns.NSVethName, "netns", ns)
		cg := filepath.Join("/sys/fs/cgroup/pids/kiln", id+"."+qemu.CgroupSuffix(dir))
		if _, err := os.Stat("/sys/fs/cgroup/pids"); err != nil {
			cg = filepath.Join("/sys/fs/cgroup/kiln", id+"."+qemu.CgroupSuffix(dir))
		}
		if err := os.MkdirAll(cg, 0o755); err != nil {
			t.Fatal(err)
		}
		vm := filepath.Join(dir, "vms", id)
		mnt := filepath.Join(vm, "jail")
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		run("mount", "-t", "tmpfs", "soak", mnt)
		if err := os.MkdirAll(filepath.Join(dir, "images", "123456789012", "app", "9"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "kiln.db.tmp"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		// Like a jailed QEMU: nothing of the data directory on its command
		// line, only its cgroup tells whose it is.
		q := exec.Command("qemu-system-x86_64", "-machine", "none", "-display", "none", "-S", "-name", id)
		if err := q.Start(); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(q.Process.Pid)), 0); err != nil {
			t.Fatal(err)
		}
		return func() {
			q.Process.Signal(syscall.SIGKILL)
			q.Wait()
			time.Sleep(100 * time.Millisecond) // the cgroup empties
			syscall.Unmount(mnt, syscall.MNT_DETACH)
			os.RemoveAll(filepath.Join(dir, "vms"))
			os.RemoveAll(filepath.Join(dir, "images"))
			os.Remove(filepath.Join(dir, "kiln.db.tmp"))
			os.Remove(cg)
			exec.Command("ip", "link", "del", netns.HostLinkName(id)).Run()
			exec.Command("ip", "netns", "del", ns).Run()
		}
	}
	undo := plant(data, id)
	defer undo()
	undoOther := plant(other, otherID)
	defer undoOther()

	l := countLeaks(ctx, data, []string{id}, nil)
	want := Leaks{QEMUProcesses: 1, NetworkNamespaces: 1, HostLinks: 1, TAPDevices: 1, NftablesTables: 1, Cgroups: 1, Mounts: 1, Files: 3}
	got := l
	got.Details = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("planted leaks counted as %+v, want %+v\n%v", got, want, l.Details)
	}
	undo()
	if l := countLeaks(ctx, data, []string{id}, nil); l.Total() != 0 {
		t.Errorf("after removing them, still counted: %+v", l)
	}
}

func randHex(t *testing.T) string {
	b := make([]byte, 10)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
