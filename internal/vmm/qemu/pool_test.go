//go:build linux

package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// procUID reads the real uid of a process.
func procUID(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "Uid:" {
			return f[1]
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return ""
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// pidAlive: the process exists and has not exited (a zombie waits for a
// parent that may be gone).
func pidAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

func vmNet(t *testing.T, id string) *vmm.NetAttachment {
	t.Helper()
	return vmNetIn(t, id, nil)
}

// vmNetIn is vmNet made in spare, a reserved process's namespace.
func vmNetIn(t *testing.T, id string, spare *os.File) *vmm.NetAttachment {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := netns.Setup(ctx, netns.Config{ID: id, Spare: spare})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Teardown(context.Background()) })
	// A server at the metadata address inside the VM's namespace (the
	// one place the namespace's rules let a guest reach without egress)
	// shows that the guest's packets arrive.
	var ln net.Listener
	if err := netns.RunInNS(n.NSPath, func() error {
		var err error
		ln, err = net.Listen("tcp4", netns.MetadataAddr.String()+":80")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "reached "+id) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return n.Attachment()
}

// reach has guest id fetch from the server in its VM network.
func reach(t *testing.T, d *Driver, id string) {
	t.Helper()
	out, errOut, _ := sh(t, d, id, `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 169.254.169.254 80`)
	if got := strings.TrimSpace(out); !strings.HasSuffix(got, "reached "+id) {
		t.Logf("stderr: %s", errOut)
		t.Errorf("%s fetched %q from its network, want %q", id, got, "reached "+id)
	}
}

// TestClonePool: a process started ahead runs under its own uid, in a
// network namespace and cgroup of its own, apart from the VMs; a clone
// takes it over (same process, the VM's network through the moved TAP,
// its own identity), survives a suspend and resume, the pool refills; a
// reserved process gets its VM network made around its TAP (no move) and
// a released one ends; deleting the template drains the pool.
func TestClonePool(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the pool's jails and networks need root")
	}
	d := newDriver(t, shortDir(t))
	d.cfg.BootTimeout = 3 * time.Minute // a busy shared host
	d.SetPoolSize(1)
	tag := randHex(3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	src := "src" + tag
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: src, RootDisk: env.RootDisk, MemoryMiB: 256, Net: vmNet(t, src)}); err != nil {
		t.Fatal(err)
	}
	tmpl := filepath.Join(shortDir(t), "tmpl")
	if _, err := d.Snapshot(ctx, src, tmpl); err != nil {
		t.Fatal(err)
	}
	first, second := "pa"+tag, "pb"+tag
	netA, netB := vmNet(t, first), vmNet(t, second)
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: first, Template: tmpl, Net: netA}); err != nil {
		t.Fatal(err)
	}
	if ph, _ := d.StartPhases(first); ph.Pooled {
		t.Fatal("the first clone of a template cannot have come from the pool")
	}
	testenv.WaitFor(t, 2*time.Minute, func() bool { return d.PoolSize(tmpl) == 1 }, "the pool to fill")
	pooled := d.PooledPIDs()
	if len(pooled) != 1 {
		t.Fatalf("pooled pids %v, want one", pooled)
	}
	pid := pooled[0]
	infoA, _ := d.Inspect(ctx, first)

	// Isolated before any clone takes it.
	uid := procUID(t, pid)
	if uid == "0" || uid == procUID(t, infoA.PID) {
		t.Errorf("pooled process runs as uid %s (the running clone as %s): want its own, not root", uid, procUID(t, infoA.PID))
	}
	ns := nsInode(t, "/proc/"+strconv.Itoa(pid)+"/ns/net")
	for _, other := range []string{"/proc/self/ns/net", netA.Netns, netB.Netns} {
		if ns == nsInode(t, other) {
			t.Errorf("pooled process shares the network namespace %s", other)
		}
	}
	if cg, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup"); !strings.Contains(string(cg), "/kiln/pool-") {
		t.Errorf("pooled process is not in a pool cgroup of its own: %s", cg)
	}
	if k, ok := statKey("/proc/" + strconv.Itoa(pid) + "/root"); !ok || !d.jailRoots()[k] {
		t.Error("pooled process is not in a jail of its own")
	}
	vms, _ := d.List(ctx)
	if len(vms) != 1 {
		t.Errorf("List shows %d VMs, want only the clone: pooled processes are not VMs", len(vms))
	}

	// Taken over by the next clone.
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: second, Template: tmpl, Net: netB}); err != nil {
		t.Fatal(err)
	}
	if ph, _ := d.StartPhases(second); !ph.Pooled {
		t.Fatal("the second clone did not come from the pool")
	}
	infoB, _ := d.Inspect(ctx, second)
	if infoB.PID != pid || procUID(t, pid) != uid {
		t.Fatalf("clone runs as pid %d uid %s, want the pooled pid %d uid %s", infoB.PID, procUID(t, infoB.PID), pid, uid)
	}
	if got := mustSh(t, d, second, "hostname"); got != second {
		t.Errorf("pooled clone's hostname %q, want %q", got, second)
	}
	reach(t, d, second)
	reach(t, d, first)
	// The moved TAP stays the VM's across a suspend (its QEMU ends).
	if err := d.Suspend(ctx, second); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Resume(ctx, second); err != nil {
		t.Fatal(err)
	}
	reach(t, d, second)

	// Refilled with a new process; drained when the template goes.
	testenv.WaitFor(t, 2*time.Minute, func() bool { return d.PoolSize(tmpl) == 1 }, "the pool to refill")
	next := d.PooledPIDs()
	if len(next) != 1 || next[0] == pid {
		t.Fatalf("pool after a take: %v (taken: %d)", next, pid)
	}

	// Reserved: the VM network is made in the process's spare namespace.
	third := "pc" + tag
	spare, ok := d.ReservePooled(tmpl, third, netns.GuestMAC.String())
	if !ok {
		t.Fatal("no process to reserve in a full pool")
	}
	for _, other := range []string{"/proc/self/ns/net", netA.Netns, netB.Netns} {
		if sameNetns(other, spare) {
			t.Errorf("the reserved process's spare namespace is %s", other)
		}
	}
	netC := vmNetIn(t, third, spare)
	if !sameNetns(netC.Netns, spare) {
		t.Fatal("Setup with a spare made a namespace of its own")
	}
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: third, Template: tmpl, Net: netC}); err != nil {
		t.Fatal(err)
	}
	infoC, _ := d.Inspect(ctx, third)
	if ph, _ := d.StartPhases(third); !ph.Pooled || infoC.PID != next[0] {
		t.Fatalf("reserved clone: pooled %v pid %d, want the reserved pid %d", ph.Pooled, infoC.PID, next[0])
	}
	if got := mustSh(t, d, third, "hostname"); got != third {
		t.Errorf("reserved clone's hostname %q, want %q", got, third)
	}
	reach(t, d, third)
	reach(t, d, second)

	// A reservation given up ends its process.
	testenv.WaitFor(t, 2*time.Minute, func() bool { return d.PoolSize(tmpl) == 1 }, "the pool to refill")
	next = d.PooledPIDs()
	if _, ok := d.ReservePooled(tmpl, "pd"+tag, netns.GuestMAC.String()); !ok {
		t.Fatal("no process to reserve in a full pool")
	}
	d.ReleasePooled("pd" + tag)
	if pidAlive(next[0]) {
		t.Errorf("released reserved process %d still runs", next[0])
	}
	testenv.WaitFor(t, 2*time.Minute, func() bool { return d.PoolSize(tmpl) == 1 }, "the pool to refill")
	next = d.PooledPIDs()
	if err := os.RemoveAll(tmpl); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, time.Minute, func() bool {
		entries, _ := os.ReadDir(d.poolDir())
		return d.PoolSize(tmpl) == 0 && !pidAlive(next[0]) && len(entries) == 0
	}, "the pool of a deleted template to drain (process killed, directory removed)")
}

// TestPooledProcessesReapedAfterKilnKilled: processes started ahead by a
// kiln that was killed are found and killed by the next start's Recover,
// which adopts the clone that did run.
func TestPooledProcessesReapedAfterKilnKilled(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up")
	}
	dataDir := shortDir(t)
	cmd, out := startHelperKiln(t, "pool-and-hang", dataDir)
	testenv.WaitFor(t, 4*time.Minute, func() bool { return strings.Contains(out.String(), "POOLED ") }, "the helper kiln to fill its pool")
	var pid int
	if _, err := fmt.Sscanf(out.String()[strings.Index(out.String(), "POOLED "):], "POOLED %d", &pid); err != nil {
		t.Fatalf("helper said %q: %v", out.String(), err)
	}
	cmd.Process.Kill()
	cmd.Wait()

	d := newDriver(t, dataDir)
	rep, err := d.Recover(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("recovery: %+v", rep)
	if pidAlive(pid) {
		t.Errorf("pooled QEMU %d of the killed kiln still runs after Recover", pid)
	}
	if len(rep.Adopted) != 1 || rep.Adopted[0] != "cloned" {
		t.Errorf("adopted %v, want [cloned]", rep.Adopted)
	}
	if entries, _ := os.ReadDir(d.poolDir()); len(entries) != 0 {
		t.Errorf("pool directory not emptied: %v", entries)
	}
	d.Terminate(context.Background(), "cloned")
	assertNoQEMU(t, d)
}

func helperPoolAndHang() {
	ctx := context.Background()
	fail := func(err error) {
		fmt.Println("helper:", err)
		os.Exit(1)
	}
	dataDir := os.Getenv("KILN_TEST_DATA")
	d, err := New(ctx, Config{DataDir: dataDir, KernelDir: os.Getenv("KILN_TEST_KERNEL"),
		AgentBinary: os.Getenv("KILN_TEST_AGENT"), PoolSize: 1, BootTimeout: 3 * time.Minute})
	if err != nil {
		fail(err)
	}
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: "src", RootDisk: os.Getenv("KILN_TEST_ROOT"), MemoryMiB: 256}); err != nil {
		fail(err)
	}
	tmpl := filepath.Join(dataDir, "tmpl")
	if _, err := d.Snapshot(ctx, "src", tmpl); err != nil {
		fail(err)
	}
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: "cloned", Template: tmpl}); err != nil {
		fail(err)
	}
	for d.PoolSize(tmpl) < 1 {
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("POOLED %d\n", d.PooledPIDs()[0])
	select {}
}
