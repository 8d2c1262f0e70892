//go:build linux

package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/applog"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// runLogging starts a microVM whose RunMicrovm named logging.
func (h *harness) runLogging(logging string) store.Microvm {
	h.t.Helper()
	seq++
	now := time.Now().UTC()
	id := fmt.Sprintf("mvm-%08x%04x", os.Getpid(), seq)
	m := store.Microvm{ID: id, Account: testAccount, ARN: "arn:aws:lambda:us-east-1:" + testAccount + ":microvm:" + id,
		State: store.StatePending, ImageName: testImage, ImageVersion: "1", MaximumDurationInSeconds: 600,
		IngressNetworkConnectors: []string{allIngress}, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute)}
	if logging != "" {
		m.Logging = json.RawMessage(logging)
	}
	ctx := context.Background()
	if err := h.st.CreateMicrovm(ctx, m, nil); err != nil {
		h.t.Fatal(err)
	}
	h.ids = append(h.ids, id)
	if err := h.eng.StartMicrovm(ctx, m); err != nil {
		h.t.Fatal(err)
	}
	return h.wait(id, store.StateRunning, 60*time.Second)
}

// readLog reads a microVM's whole log through the API's LogSource.
func (h *harness) readLog(m store.Microvm) string {
	h.t.Helper()
	var b strings.Builder
	var off int64
	for {
		data, next, err := h.eng.MicrovmLog(context.Background(), m, off, 1<<20)
		if err != nil {
			h.t.Fatal(err)
		}
		if len(data) == 0 {
			return b.String()
		}
		b.Write(data)
		off = next
	}
}

func (h *harness) waitLog(m store.Microvm, want string) string {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		l := h.readLog(m)
		if strings.Contains(l, want) {
			return l
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("log of %s lacks %q: %q", m.ID, want, l[max(0, len(l)-500):])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (h *harness) usage() store.Usage {
	h.t.Helper()
	us, err := h.st.UsageTotals(context.Background(), testAccount, time.Unix(0, 0), time.Now().Add(time.Minute))
	if err != nil || len(us) != 1 {
		h.t.Fatalf("usage: %v %v", us, err)
	}
	return us[0]
}

func logBytes(t *testing.T, dir string) (total int64, files int) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".log") {
			info, _ := e.Info()
			total += info.Size()
			files++
		}
	}
	return total, files
}

// TestLogsEventsUsage runs two small microVMs through a kiln restart, a
// suspend and resume, a flood of output and their end, and checks what
// kiln keeps: the app's output on disk (read after the restart and after
// the VM ended; nothing for logging disabled; a flood within the cap
// while the endpoint stays fast), every state change with its reason,
// and usage that grows while a VM runs and survives the restart.
func TestLogsEventsUsage(t *testing.T) {
	needFixture(t)
	ctx := context.Background()
	work := shortDir(t)
	dataDir, stateDir := filepath.Join(work, "d"), filepath.Join(work, "s")
	// The consoles of VMs go to whichever log manager is current.
	var cur atomic.Pointer[applog.Manager]
	newDrv := func() *qemu.Driver {
		c, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		d, err := qemu.New(c, qemu.Config{DataDir: dataDir, KernelDir: fx.Env.KernelDir, AgentBinary: fx.Env.AgentBinary,
			Console: func(id string) io.Writer {
				if m := cur.Load(); m != nil {
					return m.Console(id)
				}
				return nil
			},
			Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	const logCap = 256 << 10
	withLogs := func(c *engine.Config) {
		l, err := applog.New(filepath.Join(stateDir, "logs"), applog.Options{MaxBytes: logCap, Segments: 4})
		if err != nil {
			t.Fatal(err)
		}
		cur.Store(l)
		c.Logs, c.MeterInterval = l, 300*time.Millisecond
	}

	drvA := newDrv()
	h := newHarnessAt(t, drvA, stateDir, true, withLogs)
	kept := h.runLogging("")
	quiet := h.runLogging(`{"disabled":{}}`)
	for _, m := range []store.Microvm{kept, quiet} {
		if code, body := h.get(m.ID, "/count", h.token(m.ID), nil); code != 200 || body != "count=1" {
			t.Fatalf("GET /count of %s: %d %q", m.ID, code, body)
		}
	}
	h.waitLog(kept, "served count=1")
	// Suspend and resume, each recorded with its reason. (Before the
	// "restart": in one test process the old driver still waits for the
	// QEMU processes it started and would take a later exit for a death.)
	if err := h.srv.Suspend(ctx, testAccount, kept.ID, "UserRequested: test suspend"); err != nil {
		t.Fatal(err)
	}
	h.wait(kept.ID, store.StateSuspended, 30*time.Second)
	time.Sleep(700 * time.Millisecond)
	if err := h.srv.Resume(ctx, testAccount, kept.ID); err != nil {
		t.Fatal(err)
	}
	h.wait(kept.ID, store.StateRunning, 60*time.Second)

	time.Sleep(time.Second) // a few checkpoints
	before := h.usage()
	if before.RunningVCPUSeconds <= 0 || before.RunningGiBSeconds <= 0 {
		t.Fatalf("usage while running: %+v", before)
	}

	// "Restart": server, driver and log writers go; the VMs keep running.
	h.keep = true
	h.stop()
	drvA.Close()
	drvB := newDrv()
	t.Cleanup(func() {
		for _, id := range []string{kept.ID, quiet.ID} {
			drvB.Terminate(context.Background(), id)
			netns.Teardown(context.Background(), id)
		}
		drvB.Close()
	})
	h2 := newHarnessAt(t, drvB, stateDir, false, withLogs)
	h2.ids = []string{kept.ID, quiet.ID}
	if l := h2.readLog(kept); !strings.Contains(l, "served count=1") {
		t.Fatalf("after the restart the log lost the earlier output: %q", l)
	}
	if after := h2.usage(); after.RunningVCPUSeconds < before.RunningVCPUSeconds {
		t.Fatalf("usage shrank across the restart: %+v, was %+v", after, before)
	}
	if code, body := h2.get(kept.ID, "/count", h2.token(kept.ID), nil); code != 200 || body != "count=2" {
		t.Fatalf("after restart: %d %q", code, body)
	}
	h2.waitLog(kept, "served count=2")
	time.Sleep(time.Second)
	if grown := h2.usage(); grown.RunningVCPUSeconds <= before.RunningVCPUSeconds {
		t.Fatalf("usage did not grow while the adopted VM ran: %+v, was %+v", grown, before)
	}

	// A flood: 8 MiB of output against a 256 KiB cap, while the endpoint
	// of the other VM is measured.
	flooded := make(chan string, 1)
	go func() {
		_, body := h2.get(kept.ID, "/flood?kib=8192", h2.token(kept.ID), nil)
		flooded <- body
	}()
	var worst time.Duration
	for i := range 5 {
		start := time.Now()
		if code, body := h2.get(quiet.ID, "/count", h2.token(quiet.ID), nil); code != 200 || body != fmt.Sprintf("count=%d", i+2) {
			t.Fatalf("GET /count during the flood: %d %q", code, body)
		}
		worst = max(worst, time.Since(start))
	}
	if body := <-flooded; body != "flooded 8192 KiB" {
		t.Fatalf("flood: %q", body)
	}
	t.Logf("slowest GET /count of another VM during an 8 MiB flood: %v", worst.Round(time.Millisecond))
	if worst > 5*time.Second {
		t.Errorf("another VM's endpoint took %v during the flood", worst)
	}
	h2.waitLog(kept, strings.Repeat("y", 1023))
	time.Sleep(2 * time.Second) // let the flood drain into the log
	if total, files := logBytes(t, filepath.Join(stateDir, "logs", kept.ID)); total > logCap || files > 4 {
		t.Fatalf("flood left %d bytes in %d files; cap %d in 4", total, files, logCap)
	}

	for _, m := range []store.Microvm{kept, quiet} {
		if err := h2.srv.Terminate(ctx, testAccount, m.ID, "UserRequested: TerminateMicrovm"); err != nil {
			t.Fatal(err)
		}
		h2.wait(m.ID, store.StateTerminated, 30*time.Second)
	}
	// After the end the log stays readable (until the retention ends).
	if l := h2.readLog(kept); !strings.Contains(l, "yyyy") {
		t.Fatalf("log after terminate: %q", l[max(0, len(l)-200):])
	}
	if _, err := os.Stat(filepath.Join(stateDir, "logs", kept.ID, "ended")); err != nil {
		t.Errorf("ended log not marked: %v", err)
	}
	// logging disabled: nothing on disk, nothing served.
	if _, err := os.Stat(filepath.Join(stateDir, "logs", quiet.ID)); !os.IsNotExist(err) {
		t.Errorf("logging disabled, yet %s has a log directory: %v", quiet.ID, err)
	}
	if l := h2.readLog(quiet); l != "" {
		t.Errorf("logging disabled, yet the log reads %q", l)
	}

	evs, _, err := h2.st.ListEvents(ctx, testAccount, store.EventFilter{Kind: store.EventMicrovm, Resource: kept.ID}, store.Page{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range evs {
		got = append(got, e.State+" "+e.Reason)
	}
	want := []string{"PENDING RunMicrovm", "RUNNING Started", "SUSPENDING UserRequested: test suspend", "SUSPENDED UserRequested: test suspend",
		"RUNNING Resumed", "TERMINATING UserRequested: TerminateMicrovm", "TERMINATED UserRequested: TerminateMicrovm"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("events:\n got %q\nwant %q", got, want)
	}
	u := h2.usage()
	if u.SuspendedGiBSeconds <= 0 || u.RunningVCPUSeconds <= before.RunningVCPUSeconds {
		t.Errorf("final usage %+v", u)
	}
	t.Logf("usage: %+v", u)
}

// slowBuilder takes a while, so that build seconds are measurable.
type slowBuilder struct{ d time.Duration }

func (s slowBuilder) Build(ctx context.Context, req engine.BuildRequest) (engine.BuildResult, error) {
	time.Sleep(s.d)
	return fakeBuilder{}.Build(ctx, req)
}

// TestBuildUsage: a finished build is metered (one build, its seconds),
// and its snapshot size counts as stored bytes; no VM boots.
func TestBuildUsage(t *testing.T) {
	needFixture(t)
	ctx := context.Background()
	dir := t.TempDir()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e, err := engine.New(ctx, engine.Config{Driver: fx.Driver, Control: lifecycle.NewStoreControl(st), Builder: slowBuilder{300 * time.Millisecond}, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	now := time.Now().UTC()
	img := store.Image{Account: testAccount, Name: "metered", ARN: "arn:img/metered", State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: testAccount, ImageName: "metered", ImageARN: img.ARN, Version: "1", State: store.VersionPending, Status: store.VersionActive, CreatedAt: now, UpdatedAt: now}
	b := store.Build{Account: testAccount, ImageName: "metered", ImageARN: img.ARN, Version: "1", ID: "metered-b1", State: store.BuildPending, Architecture: "X86_64", CreatedAt: now, UpdatedAt: now}
	if err := st.CreateImage(ctx, img, v, []store.Build{b}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.BuildImage(ctx, v, []store.Build{b}); err != nil {
		t.Fatal(err)
	}
	e.WaitBuilds()
	us, err := st.UsageTotals(ctx, testAccount, now.Add(-time.Minute), time.Now().Add(time.Minute))
	if err != nil || len(us) != 1 {
		t.Fatalf("usage: %v %v", us, err)
	}
	if u := us[0]; u.Builds != 1 || u.BuildSeconds < 0.3 || u.SnapshotBytes != 42 {
		t.Errorf("usage after one 0.3 s build with a 42-byte snapshot: %+v", u)
	}
}
