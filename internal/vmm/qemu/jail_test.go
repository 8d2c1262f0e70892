//go:build linux

package qemu

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestQEMUIsJailed checks, from outside, every control of a running VM's
// jail, for a VM without a NIC (a new, empty network namespace) and one
// with a NIC (the VM's own named namespace).
func TestQEMUIsJailed(t *testing.T) {
	dataDir := shortDir(t)
	d := newDriver(t, dataDir)
	// kiln.db stands for every root-only file of the data dir.
	secret := filepath.Join(dataDir, "kiln.db")
	if err := os.WriteFile(secret, []byte("tenant secrets"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The API's loopback listener.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port

	netnsName := fmt.Sprintf("kt-jail-%d", os.Getpid())
	run(t, "ip", "netns", "add", netnsName)
	defer exec.Command("ip", "netns", "del", netnsName).Run()
	run(t, "ip", "-n", netnsName, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: "jailed", RootDisk: env.RootDisk, MemoryMiB: 256}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: "jailed-net", RootDisk: env.RootDisk, MemoryMiB: 256,
		Net: &vmm.NetAttachment{Netns: "/run/netns/" + netnsName, Tap: "tap0", MAC: "52:54:00:12:34:56"}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"jailed", "jailed-net"} {
		t.Run(id, func(t *testing.T) {
			info, err := d.Inspect(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			pid := info.PID
			p := "/proc/" + strconv.Itoa(pid)
			for _, ns := range []string{"net", "mnt", "pid"} {
				mine, _ := os.Readlink("/proc/self/ns/" + ns)
				its, err := os.Readlink(p + "/ns/" + ns)
				if err != nil || its == mine {
					t.Errorf("QEMU's %s namespace %q (%v) is kiln's", ns, its, err)
				}
			}
			if id == "jailed-net" {
				want, _ := os.Readlink("/run/netns/" + netnsName)
				if want == "" {
					var st syscall.Stat_t
					syscall.Stat("/run/netns/"+netnsName, &st)
					want = fmt.Sprintf("net:[%d]", st.Ino)
				}
				if its, _ := os.Readlink(p + "/ns/net"); its != want {
					t.Errorf("QEMU's network namespace %s, want the VM's %s", its, want)
				}
			}
			// Its root is its jail.
			a, okA := statKey(p + "/root")
			b, okB := statKey(filepath.Join(info.Dir, jailDir))
			if !okA || !okB || a != b {
				t.Errorf("QEMU's root is not %s", filepath.Join(info.Dir, jailDir))
			}
			// PID 1 of its own PID namespace.
			st, _ := os.ReadFile(p + "/status")
			if !strings.Contains(string(st), "NSpid:\t"+strconv.Itoa(pid)+"\t1\n") {
				t.Errorf("QEMU is not PID 1 of a PID namespace of its own:\n%s", grepLines(string(st), "NSpid"))
			}
			uid := -1
			for _, l := range strings.Split(string(st), "\n") {
				f := strings.Fields(l)
				switch {
				case len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:"):
					for _, x := range f[1:] {
						if x == "0" || x != f[1] {
							t.Errorf("QEMU ids: %s", l)
						}
					}
					if f[0] == "Uid:" {
						uid, _ = strconv.Atoi(f[1])
					}
				case len(f) >= 1 && f[0] == "Groups:" && len(f) > 1:
					t.Errorf("QEMU has supplementary groups: %s", l)
				case len(f) == 2 && f[0] == "NoNewPrivs:" && f[1] != "1":
					t.Errorf("QEMU: %s", l)
				case len(f) == 2 && (f[0] == "CapEff:" || f[0] == "CapPrm:" || f[0] == "CapBnd:") && strings.Trim(f[1], "0") != "":
					t.Errorf("QEMU has capabilities: %s", l)
				}
			}
			if e, err := os.ReadFile(p + "/environ"); err != nil || len(e) != 0 {
				t.Errorf("QEMU's environment %q (%v), want empty", e, err)
			}
			// Its cgroup, and the memory limit set on it.
			cg, _ := os.ReadFile(p + "/cgroup")
			name := d.cgroupName(id)
			if !strings.Contains(string(cg), "/"+name+"\n") {
				t.Errorf("QEMU is not in cgroup %s:\n%s", name, cg)
			}
			want := int64(256)<<20 + memOverheadBytes
			if got := memLimit(t, name); got != want {
				t.Errorf("memory limit %d, want %d", got, want)
			}
			// Rlimits.
			lim, _ := os.ReadFile(p + "/limits")
			for _, l := range []string{"Max open files", "Max file size", "Max processes"} {
				if !strings.Contains(grepLines(string(lim), l), "unlimited") {
					continue
				}
				t.Errorf("QEMU has no limit: %s", grepLines(string(lim), l))
			}
			// kiln.db is not in the jail, and the uid cannot open it.
			if _, err := os.Stat(p + "/root" + secret); err == nil {
				t.Errorf("%s is visible inside the jail", secret)
			}
			if out, err := asUID(uid, "", "cat "+secret); err == nil {
				t.Errorf("uid %d read %s: %q", uid, secret, out)
			}
			// The API port: reachable as that uid from the host's network
			// namespace (so the probe works), not from QEMU's.
			probe := fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d", port)
			if out, err := asUID(uid, "", probe); err != nil {
				t.Fatalf("probe from the host namespace failed: %v %s", err, out)
			}
			if _, err := asUID(uid, p+"/ns/net", probe); err == nil {
				t.Errorf("from QEMU's network namespace, uid %d reached 127.0.0.1:%d", uid, port)
			}
		})
	}
	// The cgroup goes with the VM.
	for _, id := range []string{"jailed", "jailed-net"} {
		if err := d.Terminate(ctx, id); err != nil {
			t.Fatal(err)
		}
		for _, dir := range jail.CgroupDirs(d.cgroupName(id)) {
			if _, err := os.Stat(dir); err == nil {
				t.Errorf("cgroup %s left after terminate", dir)
			}
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// asUID runs a bash script as uid (no groups), in netns if given.
func asUID(uid int, netns, script string) (string, error) {
	args := []string{"setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--", "bash", "-c", script}
	if netns != "" {
		args = append([]string{"nsenter", "--net=" + netns, "--"}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	return string(out), err
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func memLimit(t *testing.T, cgroup string) int64 {
	t.Helper()
	for _, dir := range jail.CgroupDirs(cgroup) {
		for _, f := range []string{"memory.max", "memory.limit_in_bytes"} {
			if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
				n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
				return n
			}
		}
	}
	t.Fatalf("cgroup %s has no memory limit file", cgroup)
	return 0
}

// TestRewrittenBackingFileIsRefused rewrites the backing file named in a
// suspended VM's overlay header, as a compromised QEMU could: the resume is
// refused and the named file is never opened. Put back, the VM resumes on
// its recorded chain and the guest reads its disk as before.
func TestRewrittenBackingFileIsRefused(t *testing.T) {
	dataDir := shortDir(t)
	d := newDriver(t, dataDir)
	boot(t, d, "rebased")
	ctx := context.Background()
	// A file the guest has not read since boot: after the resume its
	// reads go to the disk chain.
	before := mustSh(t, d, "rebased", "echo kept > /root/mark && sync && md5sum /bin/busybox")
	if err := d.Suspend(ctx, "rebased"); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(shortDir(t), "victim")
	st, err := os.Stat(env.RootDisk)
	if err != nil {
		t.Fatal(err)
	}
	// The victim is as large as the root disk, all zeros: read as the
	// backing file it would wreck the guest's file system.
	if err := os.WriteFile(victim, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(victim, st.Size()); err != nil {
		t.Fatal(err)
	}
	sum := func() [32]byte {
		b, _ := os.ReadFile(victim)
		return sha256.Sum256(b)
	}
	vst, _ := os.Stat(victim)
	h0 := sum()
	info, _ := d.Inspect(ctx, "rebased")
	overlay := filepath.Join(info.Dir, "disk.qcow2")
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", victim, overlay)
	out, _ := exec.Command("qemu-img", "info", "-U", overlay).CombinedOutput()
	if !strings.Contains(string(out), victim) {
		t.Fatalf("the header does not name the victim: %s", out)
	}
	if _, err := d.Resume(ctx, "rebased"); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("resume of a rewritten overlay: %v, want a refusal", err)
	}
	if i, _ := d.Inspect(ctx, "rebased"); i.State != vmm.StateSuspended {
		t.Fatalf("after the refusal the vm is %s, want suspended", i.State)
	}
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", env.RootDisk, overlay)
	if _, err := d.Resume(ctx, "rebased"); err != nil {
		t.Fatal(err)
	}
	info, _ = d.Inspect(ctx, "rebased")
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", info.PID))
	for _, f := range fds {
		if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", info.PID, f.Name())); target == victim {
			t.Errorf("QEMU opened the file named in the header (fd %s)", f.Name())
		}
	}
	after := mustSh(t, d, "rebased", "echo 3 > /proc/sys/vm/drop_caches; cat /root/mark; md5sum /bin/busybox")
	if after != "kept\n"+before {
		t.Errorf("guest reads %q after the resume, want %q", after, "kept\n"+before)
	}
	// And a write lands in the VM's own overlay, not in the victim.
	mustSh(t, d, "rebased", "dd if=/dev/urandom of=/root/big bs=1M count=4 2>/dev/null && sync")
	if err := d.Terminate(ctx, "rebased"); err != nil {
		t.Fatal(err)
	}
	vst2, _ := os.Stat(victim)
	if sum() != h0 || !vst2.ModTime().Equal(vst.ModTime()) {
		t.Error("the victim file changed")
	}
}
