//go:build linux

package engine_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// TestSurvivesHostReboot simulates a host reboot: kiln stops, every QEMU
// of its data directory is killed, the VMs' namespaces, links and
// nftables tables and the run-time directory go, and the host's boot id
// changes. A microVM suspended before it, whose memory was flushed, is
// SUSPENDED after it and resumes with its memory (the app's counter) and
// its disk (a file written before the suspend); one whose memory had not
// reached the disk, and one that was running, are TERMINATED with reasons.
func TestSurvivesHostReboot(t *testing.T) {
	needFixture(t)
	work := shortDir(t)
	dataDir := filepath.Join(work, "d")
	bootID := filepath.Join(work, "boot_id")
	writeBootID := func(id string) {
		if err := os.WriteFile(bootID, []byte(id+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newDrv := func() *qemu.Driver {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		d, err := qemu.New(ctx, qemu.Config{DataDir: dataDir, KernelDir: fx.Env.KernelDir, AgentBinary: fx.Env.AgentBinary,
			BootIDPath: bootID, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	writeBootID("11111111-1111-1111-1111-111111111111")
	stateDir := filepath.Join(work, "s")
	drvA := newDrv()
	h := newHarnessAt(t, drvA, stateDir, true)
	idle := &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: true}
	egress := "arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnInternetEgress

	// kept: suspended, flushed; unflushed: suspended, but its memory is
	// recorded as not yet durable; running: running at the "reboot".
	kept := h.runWith([]string{allIngress}, []string{egress}, idle)
	unflushed := h.run([]string{allIngress}, idle)
	running := h.run([]string{allIngress}, nil)
	if code, body := h.get(kept.ID, "/count", h.token(kept.ID), nil); code != 200 || body != "count=1" {
		t.Fatalf("before: %d %q", code, body)
	}
	execIn(t, drvA, kept.ID, "echo written-before-the-reboot > /kiln-mark && sync")
	for _, id := range []string{kept.ID, unflushed.ID} {
		if err := h.srv.Suspend(context.Background(), testAccount, id, "UserRequested: test"); err != nil {
			t.Fatal(err)
		}
		h.wait(id, store.StateSuspended, 60*time.Second)
	}
	vmJSON := func(id string) string { return filepath.Join(dataDir, "vms", id, "vm.json") }
	waitDurable(t, vmJSON(kept.ID), 60*time.Second)
	waitDurable(t, vmJSON(unflushed.ID), 60*time.Second)
	info, err := drvA.Inspect(context.Background(), running.ID)
	if err != nil || info.PID == 0 {
		t.Fatalf("inspect running: %+v %v", info, err)
	}

	// Stop kiln (the VMs outlive it, as they would).
	h.keep = true
	h.stop()
	drvA.Close()

	// The reboot.
	syscall.Kill(info.PID, syscall.SIGKILL)
	for _, id := range []string{kept.ID, unflushed.ID, running.ID} {
		if err := netns.Teardown(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	simulateRebootHostState(t)
	// As if the host died before the flush of this one finished.
	editMeta(t, vmJSON(unflushed.ID), func(m map[string]any) { m["durable_gen"] = 0 })
	writeBootID("22222222-2222-2222-2222-222222222222")

	drvB := newDrv()
	t.Cleanup(func() {
		for _, id := range []string{kept.ID, unflushed.ID, running.ID} {
			drvB.Terminate(context.Background(), id)
			netns.Teardown(context.Background(), id)
		}
		drvB.Close()
	})
	h2 := newHarnessAt(t, drvB, stateDir, false)
	h2.ids = []string{kept.ID, unflushed.ID, running.ID}
	h2.wait(kept.ID, store.StateSuspended, 10*time.Second)
	if s := h2.wait(unflushed.ID, store.StateTerminated, 30*time.Second); !strings.HasPrefix(s.StateReason, "VMLost") {
		t.Errorf("unflushed: reason %q, want VMLost...", s.StateReason)
	}
	if s := h2.wait(running.ID, store.StateTerminated, 30*time.Second); !strings.HasPrefix(s.StateReason, "VMLost") {
		t.Errorf("running at the reboot: reason %q, want VMLost...", s.StateReason)
	}
	n, err := netns.Open(context.Background(), kept.ID)
	if err != nil {
		t.Fatalf("network of the kept microvm after the reboot: %v", err)
	}
	if !n.Egress {
		t.Error("the recreated network lost INTERNET_EGRESS")
	}

	// Resume through the endpoint (auto-resume): memory and disk kept.
	if code, body := h2.get(kept.ID, "/count", h2.token(kept.ID), nil); code != 200 || body != "count=2" {
		t.Fatalf("after the reboot: %d %q, want count=2 (memory kept)", code, body)
	}
	h2.wait(kept.ID, store.StateRunning, 5*time.Second)
	if out := execIn(t, drvB, kept.ID, "cat /kiln-mark"); strings.TrimSpace(out) != "written-before-the-reboot" {
		t.Errorf("disk after the reboot: %q", out)
	}
	if g, _ := h2.eng.Guest(kept.ID); g == nil || !g.HasDNS() {
		t.Error("no dns forwarder for the egress microvm after the reboot")
	}
	if _, err := os.Stat(filepath.Join(netns.HostStateDir)); err != nil {
		t.Errorf("run-time dir not made again: %v", err)
	}
}

func execIn(t *testing.T, d *qemu.Driver, id, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := d.Agent(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, code, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", script}})
	if err != nil || code != 0 {
		t.Fatalf("%s in %s: exit %d, %v: %s", script, id, code, err, errOut)
	}
	return out
}

// waitDurable waits until a suspended VM's memory is recorded flushed.
func waitDurable(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var m struct {
			SuspendGen uint64 `json:"suspend_gen"`
			DurableGen uint64 `json:"durable_gen"`
		}
		b, err := os.ReadFile(path)
		if err == nil && json.Unmarshal(b, &m) == nil && m.SuspendGen > 0 && m.DurableGen == m.SuspendGen {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: memory never recorded durable: %s", path, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func editMeta(t *testing.T, path string, f func(map[string]any)) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	f(m)
	b, _ = json.Marshal(m)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// simulateRebootHostState removes what a reboot removes of kiln's host
// state: the host nftables table and the run-time directory (the VMs'
// namespaces, links and tables went with their Teardown). Other kiln
// processes on this machine (parallel test runs) may have VM networks
// that need the table; then it stays, and the test says so. The recorded
// ip_forward value is put back afterwards (a real reboot resets
// ip_forward too; a test must not change the host's setting).
func simulateRebootHostState(t *testing.T) {
	t.Helper()
	orig, origErr := os.ReadFile(filepath.Join(netns.HostStateDir, "ip_forward.orig"))
	t.Cleanup(func() {
		if origErr == nil {
			os.MkdirAll(netns.HostStateDir, 0o755)
			os.WriteFile(filepath.Join(netns.HostStateDir, "ip_forward.orig"), orig, 0o644)
		}
	})
	others, _ := filepath.Glob(filepath.Join(netns.NetnsDir, netns.NSPrefix+"*"))
	if len(others) > 0 {
		t.Logf("%d other kiln VM networks on this host (parallel tests): host table and %s kept", len(others), netns.HostStateDir)
		return
	}
	if out, err := exec.Command("nft", "delete", "table", "inet", netns.TableName).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
		t.Logf("nft delete table: %v: %s", err, out)
	}
	if err := os.RemoveAll(netns.HostStateDir); err != nil {
		t.Fatal(err)
	}
}
