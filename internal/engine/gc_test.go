//go:build linux

package engine_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// linkBuilder is a small real build: the version's template is made in
// the build's own output folder (hard links of the test template, as the
// template cache links its entries), so it lives where garbage collection
// looks, and every clone of the version reads it there.
type linkBuilder struct{}

func (linkBuilder) Build(ctx context.Context, req engine.BuildRequest) (engine.BuildResult, error) {
	fmt.Fprintf(req.Log, "linking the template for build %s\n", req.Build.ID)
	dst := filepath.Join(req.OutDir, "template")
	if out, err := exec.CommandContext(ctx, "cp", "-al", fx.Template, dst).CombinedOutput(); err != nil {
		return engine.BuildResult{}, fmt.Errorf("cp -al: %v: %s", err, out)
	}
	// A build takes a while: GC passes run while its files exist and
	// its version is not SUCCESSFUL yet.
	select {
	case <-time.After(500 * time.Millisecond):
	case <-ctx.Done():
		return engine.BuildResult{}, ctx.Err()
	}
	return engine.BuildResult{TemplateDir: dst}, nil
}

// TestGCRacesBuildsAndRuns runs garbage collection in a tight loop while
// images are built and microVMs of them run, suspend, resume and end: every
// build and every run succeeds and every version's template stays. Around
// it, GC must remove what nothing references (a version folder and a VM
// network with no record) and end a suspended microVM whose memory file
// is gone.
func TestGCRacesBuildsAndRuns(t *testing.T) {
	needFixture(t)
	dir := shortDir(t)
	h := newHarnessAt(t, fx.Driver, dir, true, func(c *engine.Config) { c.Builder = linkBuilder{} })
	refs := &gc.References{}
	col := gc.New(gc.Config{Store: h.st, DataDir: dir, Engine: h.eng, References: refs, ArtifactGrace: time.Nanosecond})

	// A suspended microVM whose memory file then vanishes.
	lost := h.run([]string{allIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: true})
	if err := h.srv.Suspend(context.Background(), testAccount, lost.ID, "UserRequested: test"); err != nil {
		t.Fatal(err)
	}
	h.wait(lost.ID, store.StateSuspended, 60*time.Second)
	info, err := fx.Driver.Inspect(context.Background(), lost.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(info.Dir, "mem")); err != nil {
		t.Fatal(err)
	}
	// Orphans: a version folder with no record, a marked VM network with
	// no record.
	orphanDir := h.eng.ImageDir(testAccount, "gone", "7")
	os.MkdirAll(filepath.Join(orphanDir, "build-x"), 0o700)
	orphanNet := fmt.Sprintf("mvm-%08x%04x", os.Getpid(), 0xeeee)
	if err := h.eng.MarkNet(orphanNet); err != nil {
		t.Fatal(err)
	}
	if _, err := netns.Setup(context.Background(), netns.Config{ID: orphanNet}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Teardown(context.Background(), orphanNet) })

	ctx, cancel := context.WithCancel(context.Background())
	var passes atomic.Int64
	var gcErrs []error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := col.Run(ctx); err != nil && ctx.Err() == nil {
				gcErrs = append(gcErrs, err)
			}
			passes.Add(1)
		}
	}()

	const images = 3
	errc := make(chan error, images)
	for i := 0; i < images; i++ {
		go func(i int) { errc <- buildAndRun(h, refs, fmt.Sprintf("race%d", i)) }(i)
	}
	for i := 0; i < images; i++ {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	for start := passes.Load(); passes.Load() < start+2; {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	t.Logf("%d gc passes during the builds and runs", passes.Load())
	for _, err := range gcErrs {
		t.Errorf("gc pass: %v", err)
	}
	for i := 0; i < images; i++ {
		img := fmt.Sprintf("race%d", i)
		tmpl, err := h.eng.TemplateFor(testAccount, img, "1")
		if err != nil {
			t.Errorf("%s: %v", img, err)
			continue
		}
		if _, err := os.Stat(filepath.Join(tmpl, "template.json")); err != nil {
			t.Errorf("%s: the template of a live version went: %v", img, err)
		}
	}
	if m, _ := h.st.GetMicrovm(context.Background(), testAccount, lost.ID); m.State != store.StateTerminated || !strings.HasPrefix(m.StateReason, "SnapshotLost") {
		t.Errorf("suspended microvm without memory: %s %q, want TERMINATED SnapshotLost...", m.State, m.StateReason)
	}
	if _, err := os.Stat(orphanDir); !os.IsNotExist(err) {
		t.Errorf("version folder with no record still there: %v", err)
	}
	if _, err := netns.Open(context.Background(), orphanNet); err == nil {
		t.Error("vm network with no record still there")
	}
}

var raceSeq atomic.Int64
var idsMu sync.Mutex

// getE is harness.get for goroutines: errors come back as code 0.
func (h *harness) getE(id, path, tok string) (int, string) {
	req, _ := http.NewRequest("GET", "https://"+id+"."+testDomain+path, nil)
	req.Header.Set(proxy.HeaderAuth, tok)
	resp, err := h.client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b)
}

// buildAndRun records an image as the API does (under References), builds
// it through the engine, then runs a microVM of it through a suspend and a
// resume (memory kept) and terminates it.
func buildAndRun(h *harness, refs *gc.References, name string) error {
	ctx := context.Background()
	now := time.Now().UTC()
	arn := "arn:aws:lambda:us-east-1:" + testAccount + ":microvm-image:" + name
	port := int64(8080)
	v := store.ImageVersion{Account: testAccount, ImageName: name, ImageARN: arn, Version: "1", State: store.VersionPending, Status: store.VersionActive,
		Config: store.ImageConfig{Hooks: &store.Hooks{Port: &port}}, CreatedAt: now, UpdatedAt: now}
	b := store.Build{Account: testAccount, ImageName: name, ImageARN: arn, Version: "1", ID: name + "-build", State: store.BuildPending, Architecture: "X86_64", CreatedAt: now}
	release := refs.Hold()
	err := h.st.CreateImage(ctx, store.Image{Account: testAccount, Name: name, ARN: arn, State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now},
		v, []store.Build{b}, nil)
	release()
	if err != nil {
		return err
	}
	if err := h.eng.BuildImage(ctx, v, []store.Build{b}); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		got, err := h.st.GetImageVersion(ctx, testAccount, name, "1")
		if err != nil {
			return err
		}
		if got.State == store.VersionSuccessful {
			break
		}
		if got.State == store.VersionFailed || time.Now().After(deadline) {
			return fmt.Errorf("build of %s: %s %s", name, got.State, got.StateReason)
		}
		time.Sleep(50 * time.Millisecond)
	}
	id := fmt.Sprintf("mvm-%08x%04x", os.Getpid(), 0xa000+raceSeq.Add(1))
	m := store.Microvm{ID: id, Account: testAccount, ARN: "arn:aws:lambda:us-east-1:" + testAccount + ":microvm:" + id,
		State: store.StatePending, ImageName: name, ImageVersion: "1", MaximumDurationInSeconds: 600,
		IngressNetworkConnectors: []string{allIngress}, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute)}
	if err := h.st.CreateMicrovm(ctx, m, nil); err != nil {
		return err
	}
	idsMu.Lock()
	h.ids = append(h.ids, id)
	idsMu.Unlock()
	if err := h.eng.StartMicrovm(ctx, m); err != nil {
		return err
	}
	wait := func(want store.MicrovmState) error {
		deadline := time.Now().Add(90 * time.Second)
		for {
			got, err := h.st.GetMicrovm(ctx, testAccount, id)
			if err != nil {
				return err
			}
			if got.State == want {
				return nil
			}
			if got.State == store.StateTerminated || time.Now().After(deadline) {
				return fmt.Errorf("microvm %s of %s: %s (%s), want %s", id, name, got.State, got.StateReason, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	count := func(want string) error {
		code, body := h.getE(id, "/count", h.token(id))
		if code != 200 || body != want {
			return fmt.Errorf("microvm %s of %s: GET /count = %d %q, want %q", id, name, code, body, want)
		}
		return nil
	}
	for _, step := range []func() error{
		func() error { return wait(store.StateRunning) },
		func() error { return count("count=1") },
		func() error { return h.srv.Suspend(ctx, testAccount, id, "UserRequested: test") },
		func() error { return wait(store.StateSuspended) },
		func() error { return h.srv.Resume(ctx, testAccount, id) },
		func() error { return wait(store.StateRunning) },
		func() error { return count("count=2") },
		func() error { return h.srv.Terminate(ctx, testAccount, id, "UserRequested: test") },
		func() error { return wait(store.StateTerminated) },
	} {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}
