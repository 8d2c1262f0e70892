//go:build linux

package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
	"golang.org/x/sys/unix"
)

// These tests boot real VMs (TCG on these hosts). Outside CI they skip
// when the engine is not set up; in CI (CI=true) they fail instead.

var env *vmmtest.Env

func TestMain(m *testing.M) {
	if root := os.Getenv("KILN_TEST_CGROUP_ROOT"); root != "" && os.Getenv("KILN_TEST_HELPER") != "" {
		// A helper kiln in a Pod with a cgroup namespace of its own
		// (TestQEMUOutlivesItsPodCgroupNS): --cgroup-root, --host-cgroupns.
		if err := jail.Configure(jail.Config{CgroupRoot: root, HostCgroupNS: os.Getenv("KILN_TEST_HOST_CGROUPNS")}); err != nil {
			fmt.Println("helper:", err)
			os.Exit(1)
		}
	}
	if os.Getenv("KILN_TEST_HELPER") == "adopt-and-terminate" {
		helperAdoptAndTerminate("keep")
		return
	}
	if os.Getenv("KILN_TEST_HELPER") == "boot-and-hang" {
		helperBootAndHang([]string{"keep", "sleepy", "midsave", "saved"}, "sleepy")
		return
	}
	if os.Getenv("KILN_TEST_HELPER") == "boot-one-and-hang" {
		helperBootAndHang([]string{"keep"}, "")
		return
	}
	if os.Getenv("KILN_TEST_HELPER") == "pool-and-hang" {
		helperPoolAndHang()
		return
	}
	env = vmmtest.SetupOrSkip("qemu")
	code := m.Run()
	env.Cleanup()
	os.Exit(code)
}

func newDriver(t *testing.T, dataDir string) *Driver {
	t.Helper()
	if env == nil {
		t.Skip("engine not set up (run make setup)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := New(ctx, Config{DataDir: dataDir, KernelDir: env.KernelDir, AgentBinary: env.AgentBinary,
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vms, _ := d.List(context.Background())
		for _, v := range vms {
			d.Terminate(context.Background(), v.ID)
		}
		d.Close()
	})
	return d
}

func shortDir(t *testing.T) string {
	// Unix socket paths must stay under 108 bytes; t.TempDir can be long.
	dir, err := os.MkdirTemp("", "kt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func boot(t *testing.T, d *Driver, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: id, RootDisk: env.RootDisk, MemoryMiB: 512}); err != nil {
		t.Fatal(err)
	}
}

// sh runs a shell command in the guest and returns stdout, stderr, code.
func sh(t *testing.T, d *Driver, id, script string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := d.Agent(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, code, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", script}})
	if err != nil {
		t.Fatalf("exec %q in %s: %v", script, id, err)
	}
	return out, errOut, code
}

func mustSh(t *testing.T, d *Driver, id, script string) string {
	t.Helper()
	out, errOut, code := sh(t, d, id, script)
	if code != 0 {
		t.Fatalf("%q in %s exited %d: %s", script, id, code, errOut)
	}
	return strings.TrimSpace(out)
}

func TestExecOutputAndExitCode(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "exec")
	tests := []struct {
		name     string
		script   string
		wantOut  string
		wantErr  string
		wantCode int
	}{
		{"success", "echo hello", "hello\n", "", 0},
		{"stderr and code", "echo out; echo oops >&2; exit 7", "out\n", "oops\n", 7},
		{"large output", "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done | tail -n 1", "line-1999\n", "", 0},
		{"killed by signal", "kill -9 $$", "", "", 137},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, code := sh(t, d, "exec", tt.script)
			if out != tt.wantOut || errOut != tt.wantErr || code != tt.wantCode {
				t.Errorf("got (%q, %q, %d), want (%q, %q, %d)", out, errOut, code, tt.wantOut, tt.wantErr, tt.wantCode)
			}
		})
	}
}

func snapshot(t *testing.T, d *Driver, id string) string {
	t.Helper()
	dir := filepath.Join(shortDir(t), "tmpl")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := d.Snapshot(ctx, id, dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func clone(t *testing.T, d *Driver, tmpl, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl}); err != nil {
		t.Fatal(err)
	}
}

func TestSnapshotClonesDivergeAndDiffer(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "src")
	// A memory-only value (tmpfs) and a disk value, both set before the snapshot.
	mustSh(t, d, "src", "mkdir -p /mem && mount -t tmpfs tmpfs /mem && echo base > /mem/v && echo base > /root/v && sync")
	tmpl := snapshot(t, d, "src")
	if _, err := d.Inspect(context.Background(), "src"); err == nil {
		t.Error("the snapshotted VM still exists")
	}
	clone(t, d, tmpl, "c1")
	clone(t, d, tmpl, "c2")
	for _, id := range []string{"c1", "c2"} {
		if got := mustSh(t, d, id, "cat /mem/v /root/v"); got != "base\nbase" {
			t.Fatalf("%s sees %q before writing, want the snapshot's values", id, got)
		}
		mustSh(t, d, id, fmt.Sprintf("echo %s > /mem/v && echo %s > /root/v && sync", id, id))
	}
	for _, id := range []string{"c1", "c2"} {
		if got := mustSh(t, d, id, "cat /mem/v /root/v"); got != id+"\n"+id {
			t.Errorf("%s reads %q, want only its own value", id, got)
		}
	}
	// Same snapshot, different entropy: vmgenid and the agent's reseed.
	r1 := mustSh(t, d, "c1", "head -c 32 /dev/urandom | od -An -tx1")
	r2 := mustSh(t, d, "c2", "head -c 32 /dev/urandom | od -An -tx1")
	if r1 == r2 {
		t.Errorf("two clones read the same 32 random bytes: %s", r1)
	}
	if h := mustSh(t, d, "c2", "hostname"); h != "c2" {
		t.Errorf("clone hostname %q, want c2", h)
	}
	// Each QEMU dropped root for a uid of its own.
	u1, u2 := qemuUID(t, d, "c1"), qemuUID(t, d, "c2")
	if u1 == 0 || u2 == 0 || u1 == u2 {
		t.Errorf("clones' QEMU uids %d and %d: want two different non-root uids", u1, u2)
	}
	// The template is unchanged by its clones.
	clone(t, d, tmpl, "c3")
	if got := mustSh(t, d, "c3", "cat /mem/v /root/v"); got != "base\nbase" {
		t.Errorf("a new clone sees %q: the template changed", got)
	}
}

// qemuUID reads the real, effective, saved and filesystem uids of the VM's
// QEMU; they must agree.
func qemuUID(t *testing.T, d *Driver, id string) int {
	t.Helper()
	info, err := d.Inspect(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", info.PID))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" {
			if f[1] != f[2] || f[1] != f[3] || f[1] != f[4] {
				t.Fatalf("QEMU of %s has mixed uids: %s", id, line)
			}
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no Uid line in /proc/%d/status", info.PID)
	return 0
}

func TestSuspendResumeKeepsMemoryDiskAndClock(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "sr")
	tmpl := snapshot(t, d, "sr")
	// Suspend a clone (private memory) and then, after resuming, suspend
	// the same VM again (its memory is then its own file): both paths.
	clone(t, d, tmpl, "sr1")
	ctx := context.Background()
	a, _ := d.Agent(ctx, "sr1")
	if _, err := a.Exec(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c",
		"mkdir -p /mem && mount -t tmpfs tmpfs /mem; i=0; while true; do i=$((i+1)); echo $i > /mem/n; sleep 0.05; done"},
		Background: true}); err != nil {
		t.Fatal(err)
	}
	mustSh(t, d, "sr1", "echo kept > /root/file && sync")
	uid := qemuUID(t, d, "sr1")
	for round := 1; round <= 2; round++ {
		time.Sleep(500 * time.Millisecond)
		before, _ := strconv.Atoi(mustSh(t, d, "sr1", "cat /mem/n"))
		if before == 0 {
			t.Fatal("counter is not counting")
		}
		if err := d.Suspend(ctx, "sr1"); err != nil {
			t.Fatal(err)
		}
		info, _ := d.Inspect(ctx, "sr1")
		if info.State != vmm.StateSuspended || info.PID != 0 {
			t.Fatalf("after suspend: %+v", info)
		}
		if round == 2 {
			time.Sleep(10 * time.Second)
		}
		if _, err := d.Resume(ctx, "sr1"); err != nil {
			t.Fatal(err)
		}
		if u := qemuUID(t, d, "sr1"); u != uid {
			t.Errorf("resumed QEMU runs as uid %d, want the VM's %d", u, uid)
		}
		if round == 2 {
			// busybox date has no %N; adjtimex prints microseconds.
			// The guest reads its clock somewhere between these two host
			// readings (the command's round trip, long on a busy host).
			before := float64(time.Now().UnixNano()) / 1e9
			out := mustSh(t, d, "sr1", "adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} END {printf \"%d.%06d\", s, u}'")
			after := float64(time.Now().UnixNano()) / 1e9
			guest, err := strconv.ParseFloat(out, 64)
			if err != nil {
				t.Fatalf("guest clock %q: %v", out, err)
			}
			if guest < before-1 || guest > after+1 {
				t.Errorf("guest clock %.3f is outside the host's [%.3f, %.3f] (±1 s) after a 10 s suspend", guest, before, after)
			}
		}
		after, _ := strconv.Atoi(mustSh(t, d, "sr1", "cat /mem/n"))
		if after < before {
			t.Errorf("round %d: counter went from %d back to %d", round, before, after)
		}
		if after > before+40 {
			t.Errorf("round %d: counter jumped from %d to %d: it restarted or ran while suspended", round, before, after)
		}
		if got := mustSh(t, d, "sr1", "cat /root/file"); got != "kept" {
			t.Errorf("round %d: disk file reads %q", round, got)
		}
		// The loop forks a sleep per step; under TCG on a loaded host one
		// step can take longer than a fixed wait, so poll: what matters is
		// that the counter moves again, not how soon.
		moving := false
		for wait := time.Now().Add(15 * time.Second); !moving && time.Now().Before(wait); {
			time.Sleep(300 * time.Millisecond)
			later, _ := strconv.Atoi(mustSh(t, d, "sr1", "cat /mem/n"))
			moving = later > after
		}
		if !moving {
			t.Errorf("round %d: counter stopped at %d after resume", round, after)
		}
	}
}

func TestQEMUKilledIsNoticedAndCleanedUp(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "victim")
	info, _ := d.Inspect(context.Background(), "victim")
	if err := syscall.Kill(info.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	select {
	case e := <-d.Events():
		if e.ID != "victim" || e.State != vmm.StateStopped || !strings.Contains(e.Reason, "killed") {
			t.Errorf("event %+v, want victim stopped by kill", e)
		}
		// The exit is watched, not polled; the bound leaves room for a
		// loaded host to free the guest's memory and remove its cgroups
		// before the event.
		if lag := time.Since(killed); lag > 5*time.Second {
			t.Errorf("noticed after %v, want within 5 s", lag)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5 s of kill -9")
	}
	testenv.WaitFor(t, 5*time.Second, func() bool {
		_, err := os.Stat(info.Dir)
		return os.IsNotExist(err)
	}, "the dead VM's directory to be removed")
	got, _ := d.Inspect(context.Background(), "victim")
	if got.State != vmm.StateStopped || !strings.Contains(got.Reason, "killed") {
		t.Errorf("inspect after death: %+v", got)
	}
	if err := d.Terminate(context.Background(), "victim"); err != nil {
		t.Fatal(err)
	}
	assertNoQEMU(t, d)
}

// startHelperKiln runs this test binary as a separate kiln (TestMain's
// KILN_TEST_HELPER modes) on dataDir; out collects what it prints. With
// cgroupProcs (cgroup.procs files) it first joins those cgroups, as a
// container runtime puts a container's process into its cgroups.
func startHelperKiln(t *testing.T, mode, dataDir string, cgroupProcs ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	return startHelperKilnIn(t, mode, dataDir, helperPlace{cgroupProcs: cgroupProcs})
}

// helperPlace is where a helper kiln runs, as a container runtime places
// a container's process.
type helperPlace struct {
	cgroupProcs []string // cgroup.procs files it joins first
	cgroupNS    bool     // then a new cgroup namespace rooted there
	env         []string
}

func startHelperKilnIn(t *testing.T, mode, dataDir string, p helperPlace) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	if len(p.cgroupProcs) > 0 {
		exe := `"$KILN_TEST_BIN"`
		if p.cgroupNS {
			exe = `unshare --cgroup "$KILN_TEST_BIN"`
		}
		script := `for f in "$@"; do echo $$ > "$f" || exit 1; done; exec ` + exe + ` -test.run='^$'`
		cmd = exec.Command("sh", append([]string{"-c", script, "sh"}, p.cgroupProcs...)...)
		cmd.Env = append(cmd.Env, "KILN_TEST_BIN="+os.Args[0])
	}
	cmd.Env = append(append(append(cmd.Env, os.Environ()...), p.env...), "KILN_TEST_HELPER="+mode, "KILN_TEST_DATA="+dataDir,
		"KILN_TEST_KERNEL="+env.KernelDir, "KILN_TEST_AGENT="+env.AgentBinary, "KILN_TEST_ROOT="+env.RootDisk)
	out := new(bytes.Buffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// QEMU outlives its kiln by design: a test that fails before its
	// own driver ended the helper's VMs must not leave them running (a
	// later test, or another run on this host, would find them).
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		killLeftQEMUs(t, dataDir)
	})
	return cmd, out
}

// killLeftQEMUs kills the QEMU processes of dataDir that are still alive
// and removes their cgroups.
func killLeftQEMUs(t *testing.T, dataDir string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := New(ctx, Config{DataDir: dataDir, KernelDir: env.KernelDir, AgentBinary: env.AgentBinary,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Logf("checking for QEMU left by a helper kiln: %v", err)
		return
	}
	defer d.Close()
	for _, pid := range d.killStrays(map[int]bool{}) {
		t.Logf("killed QEMU %d left by a helper kiln", pid)
	}
}

// TestKilnKilledThenRecovered kills a separate kiln process (this test
// binary re-run as a helper) that booted a VM, then checks that a new
// driver adopts that VM, removes leftovers, and terminates cleanly.
func TestKilnKilledThenRecovered(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up")
	}
	dataDir := shortDir(t)
	cmd, out := startHelperKiln(t, "boot-and-hang", dataDir)
	testenv.WaitFor(t, 120*time.Second, func() bool { return strings.Contains(out.String(), "READY") }, "the helper kiln to boot its VMs")
	cmd.Process.Kill()
	cmd.Wait()

	// Leftovers a crash can leave: a directory without a record, and a
	// QEMU process of this data dir that no record claims.
	stray := filepath.Join(dataDir, "vms", "stray")
	os.MkdirAll(stray, 0o700)
	d := newDriver(t, dataDir)
	// And a cgroup whose QEMU ended while kiln was down.
	for _, dir := range jail.CgroupDirs(d.cgroupName("ghost")) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := d.Recover(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("recovery: %+v", rep)
	// midsave's suspend was cut short while its state still streamed: the
	// guest runs on. saved's was complete: it stays suspended.
	slices.Sort(rep.Adopted)
	slices.Sort(rep.Suspended)
	if !slices.Equal(rep.Adopted, []string{"keep", "midsave"}) {
		t.Fatalf("adopted %v, want [keep midsave]", rep.Adopted)
	}
	if !slices.Equal(rep.Suspended, []string{"saved", "sleepy"}) {
		t.Fatalf("suspended %v, want [saved sleepy]", rep.Suspended)
	}
	if _, err := os.Stat(stray); !os.IsNotExist(err) {
		t.Error("stray directory not removed")
	}
	for _, dir := range jail.CgroupDirs(d.cgroupName("ghost")) {
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("stray cgroup %s not removed", dir)
		}
	}
	if got := mustSh(t, d, "keep", "cat /root/mark"); got != "before-crash" {
		t.Errorf("adopted VM lost its disk: %q", got)
	}
	if got := mustSh(t, d, "midsave", "cat /root/mark"); got != "before-crash" {
		t.Errorf("VM adopted mid-save lost its disk: %q", got)
	}
	// Its guest must stay running, not be stopped again by the end of the
	// save that was interrupted.
	time.Sleep(time.Second)
	if got := mustSh(t, d, "midsave", "echo alive"); got != "alive" {
		t.Errorf("VM adopted mid-save: %q", got)
	}
	for _, id := range []string{"sleepy", "saved"} {
		if _, err := d.Resume(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		if got := mustSh(t, d, id, "cat /root/mark"); got != "before-crash" {
			t.Errorf("resumed VM %s lost its disk: %q", id, got)
		}
	}
	for _, id := range []string{"midsave", "saved"} {
		if err := d.Suspend(context.Background(), id); err != nil {
			t.Fatalf("suspending %s after recovery: %v", id, err)
		}
	}
	// A VM killed while kiln is down is noticed by recovery too.
	for _, id := range []string{"keep", "sleepy", "midsave", "saved"} {
		if err := d.Terminate(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	assertNoQEMU(t, d)
	entries, _ := os.ReadDir(filepath.Join(dataDir, "vms"))
	if len(entries) != 0 {
		t.Errorf("vms directory not empty after terminate: %v", entries)
	}
}

// helperBootAndHang boots the VMs ids, marks their disks, suspends
// suspend (if not ""), says READY and waits to be killed.
func helperBootAndHang(ids []string, suspend string) {
	ctx := context.Background()
	d, err := New(ctx, Config{DataDir: os.Getenv("KILN_TEST_DATA"), KernelDir: os.Getenv("KILN_TEST_KERNEL"),
		AgentBinary: os.Getenv("KILN_TEST_AGENT")})
	if err != nil {
		fmt.Println("helper:", err)
		os.Exit(1)
	}
	for _, id := range ids {
		if _, err := d.Boot(ctx, vmm.BootSpec{ID: id, RootDisk: os.Getenv("KILN_TEST_ROOT")}); err != nil {
			fmt.Println("helper:", err)
			os.Exit(1)
		}
		a, _ := d.Agent(ctx, id)
		a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", "echo before-crash > /root/mark; sync"}})
	}
	if suspend != "" {
		if err := d.Suspend(ctx, suspend); err != nil {
			fmt.Println("helper:", err)
			os.Exit(1)
		}
	}
	if err := interruptSuspends(ctx, d, ids); err != nil {
		fmt.Println("helper:", err)
		os.Exit(1)
	}
	fmt.Println("READY")
	select {}
}

// keepOpen holds what a helper kiln keeps open until it is killed.
var keepOpen []*os.File

// interruptSuspends leaves VM "midsave" as a kiln killed while QEMU still
// streams a suspend's state, and VM "saved"
// as one killed after the save was complete but before QEMU quit.
func interruptSuspends(ctx context.Context, d *Driver, ids []string) error {
	for _, id := range ids {
		if id != "midsave" && id != "saved" {
			continue
		}
		v, err := d.get(id)
		if err != nil {
			return err
		}
		v.op.Lock() // never released: kiln "dies" mid-operation
		if err := v.setState(vmm.StateRunning, phaseSuspending); err != nil {
			return err
		}
		if id == "saved" {
			if err := v.pauseAndSave(ctx, v.path("state.tmp"), v.path("mem.tmp")); err != nil {
				return err
			}
			if err := os.Rename(v.path("state.tmp"), v.path("state")); err != nil {
				return err
			}
			continue
		}
		if err := v.qmp.Execute(ctx, "stop", nil, nil); err != nil {
			return err
		}
		if err := setIgnoreShared(ctx, v.qmp); err != nil {
			return err
		}
		// As saveSplit does, kiln reads the stream itself; here it never
		// does, so QEMU blocks on a full pipe until kiln dies.
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 4096)
		keepOpen = append(keepOpen, r)
		set, err := v.qmp.AddFD(ctx, w)
		w.Close()
		if err != nil {
			return err
		}
		// QEMU answers only once the stream's end is written, which it
		// never is: the stopped guest's state is saved under QEMU's lock.
		go v.qmp.Execute(context.Background(), "migrate", map[string]any{"uri": fmt.Sprintf("file:/dev/fdset/%d", set)}, nil)
		time.Sleep(time.Second)
	}
	return nil
}

// helperAdoptAndTerminate is the next kiln of TestQEMUOutlivesItsPodCgroupNS:
// it adopts VM id, reads its disk's mark, terminates it and says so.
func helperAdoptAndTerminate(id string) {
	ctx := context.Background()
	d, err := New(ctx, Config{DataDir: os.Getenv("KILN_TEST_DATA"), KernelDir: os.Getenv("KILN_TEST_KERNEL"),
		AgentBinary: os.Getenv("KILN_TEST_AGENT")})
	if err != nil {
		fmt.Println("helper:", err)
		os.Exit(1)
	}
	rep, err := d.Recover(ctx)
	fmt.Println("ADOPTED", rep.Adopted, err)
	if a, err := d.Agent(ctx, id); err == nil {
		out, _, _, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/cat", "/root/mark"}})
		fmt.Printf("MARK %q %v\n", strings.TrimSpace(out), err)
	}
	fmt.Println("TERMINATED", d.Terminate(ctx, id))
	d.Close()
}

func assertNoQEMU(t *testing.T, d *Driver) {
	t.Helper()
	if pids := d.strayProcesses(map[int]bool{}); len(pids) > 0 {
		t.Errorf("QEMU processes left behind: %v", pids)
	}
	// Nor their cgroups.
	names, _ := jail.ListCgroups(cgroupParent)
	for _, n := range names {
		if strings.HasSuffix(n, "."+d.cgroupSuffix()) {
			t.Errorf("cgroup %s left behind", n)
		}
	}
}

func TestRestoreOnOtherPlatformIsRefused(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "plat")
	tmpl := snapshot(t, d, "plat")
	t0, err := LoadTemplate(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	t0.Platform.QEMUVersion = "9.9.9"
	writeJSON(t, filepath.Join(tmpl, "template.json"), t0)
	_, err = d.Clone(context.Background(), vmm.CloneSpec{ID: "x", Template: tmpl})
	if err == nil || !strings.Contains(err.Error(), "9.9.9") || !strings.Contains(err.Error(), "rebuild") {
		t.Errorf("clone of a foreign snapshot: %v, want a refusal naming both versions", err)
	}
	if _, err := d.Inspect(context.Background(), "x"); err == nil {
		t.Error("refused clone left a VM behind")
	}
}

func TestMissingSetupNamesTheCommand(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up")
	}
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no kernel", Config{KernelDir: "/nonexistent", AgentBinary: env.AgentBinary}},
		{"no qemu", Config{KernelDir: env.KernelDir, AgentBinary: env.AgentBinary, QEMU: "qemu-system-nope"}},
		{"no agent", Config{KernelDir: env.KernelDir, AgentBinary: "/nonexistent/kiln-agent"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.DataDir = shortDir(t)
			_, err := New(context.Background(), tt.cfg)
			if err == nil || !strings.Contains(err.Error(), SetupCommand) {
				t.Errorf("got %v, want an error naming %q", err, SetupCommand)
			}
		})
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestRecoverDropsMemoryLostInAHostCrash: a suspended VM whose memory had
// not been flushed when the host restarted cannot be resumed; one from
// this boot (page cache intact) or flushed in time is kept.
func TestRecoverDropsMemoryLostInAHostCrash(t *testing.T) {
	dataDir := shortDir(t)
	tests := []struct {
		name     string
		durable  uint64
		bootID   string
		wantKept bool
	}{
		{"flushed before the crash", 1, "an-earlier-boot", true},
		{"not flushed, same boot", 0, (&Driver{}).hostBootID(), true},
		{"not flushed, host restarted", 0, "an-earlier-boot", false},
	}
	for i, tt := range tests {
		id := fmt.Sprintf("sus-%d", i)
		dir := filepath.Join(dataDir, "vms", id)
		os.MkdirAll(dir, 0o700)
		for _, f := range []string{"state", "mem", "disk.qcow2"} {
			os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
		}
		writeJSON(t, filepath.Join(dir, "vm.json"), meta{ID: id, State: vmm.StateSuspended, MemoryMiB: 512, VCPUs: 1,
			SuspendGen: 1, DurableGen: tt.durable, HostBootID: tt.bootID})
	}
	d := newDriver(t, dataDir)
	rep, err := d.Recover(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := d.Inspect(context.Background(), fmt.Sprintf("sus-%d", i))
			if kept := err == nil; kept != tt.wantKept {
				t.Errorf("kept = %v, want %v (report %+v)", kept, tt.wantKept, rep)
			}
		})
	}
}
