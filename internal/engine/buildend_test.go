//go:build linux

package engine_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// realBuilder runs internal/imagebuild behind the engine's Builder, as
// cmd/kiln's adapter does: real build VMs for RUN steps.
type realBuilder struct{ b *imagebuild.Builder }

func (r realBuilder) Build(ctx context.Context, req engine.BuildRequest) (engine.BuildResult, error) {
	res, err := r.b.Build(ctx, imagebuild.Request{Account: req.Version.Account, Source: req.Version.Config.CodeArtifact.URI,
		MemoryMiB: 512, Log: req.Log, OutDir: req.OutDir})
	if err != nil {
		return engine.BuildResult{}, err
	}
	return engine.BuildResult{TemplateDir: res.TemplateDir}, nil
}

func kilnDataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	return "/var/lib/kiln"
}

// buildVMs returns the build and image VMs the driver knows.
func buildVMs(t *testing.T) []string {
	vms, err := fx.Driver.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, v := range vms {
		if strings.HasPrefix(v.ID, imagebuild.PrefixBuild) || strings.HasPrefix(v.ID, imagebuild.PrefixImage) {
			ids = append(ids, v.ID)
		}
	}
	return ids
}

// processesNaming returns the pids whose command line holds s.
func processesNaming(s string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(s)) && e.Name() != fmt.Sprint(os.Getpid()) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestBuildsEnd: a build deleted mid-RUN stops and leaves no VM process,
// network, mount or file; a `RUN yes` build's log stops at the cap with a
// "truncated" line and the build ends at the whole-build deadline, while
// another account's microVM starts as fast as usual. (Before, a deleted
// version's build ran on, build output had no cap and a commit per 64 KiB,
// and a build had no deadline.)
func TestBuildsEnd(t *testing.T) {
	needFixture(t)
	imgData := shortDir(t)
	rb := realBuilder{&imagebuild.Builder{
		Images: &image.Builder{DataDir: imgData,
			Runner: &imagebuild.Runner{Driver: fx.Driver, MemoryMiB: 512},
			Bases:  &base.Resolver{Managed: &base.Managed{DataDir: kilnDataDir()}}},
		Driver: fx.Driver, Source: source.Config{AllowLocal: true},
	}}
	const logCap = 256 << 10
	const deadline = 60 * time.Second
	h := newHarness(t, func(c *engine.Config) {
		c.Builder, c.BuildLogMaxBytes, c.MaxConcurrentBuilds = rb, logCap, 1
	})
	ctx := context.Background()
	startBuild := func(t *testing.T, name, dockerfile string, timeout time.Duration) store.Build {
		t.Helper()
		code := t.TempDir()
		if err := os.WriteFile(filepath.Join(code, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
			t.Fatal(err)
		}
		now := time.Now().UTC()
		img := store.Image{Account: testAccount, Name: name, ARN: "arn:img/" + name, State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
		v := store.ImageVersion{Account: testAccount, ImageName: name, ImageARN: img.ARN, Version: "1", State: store.VersionPending, Status: store.VersionActive,
			Config: store.ImageConfig{CodeArtifact: &store.CodeArtifact{URI: code}}, CreatedAt: now, UpdatedAt: now}
		b := store.Build{Account: testAccount, ImageName: name, ImageARN: img.ARN, Version: "1", ID: "b-" + name, State: store.BuildPending, CreatedAt: now, UpdatedAt: now}
		if err := h.st.CreateImage(ctx, img, v, []store.Build{b}, nil); err != nil {
			t.Fatal(err)
		}
		h.eng.SetBuildTimeout(timeout) // read when the build starts
		if err := h.eng.BuildImage(ctx, v, []store.Build{b}); err != nil {
			t.Fatal(err)
		}
		return b
	}
	readLog := func(t *testing.T, id string) string {
		b, err := h.st.ReadBuildLog(ctx, id, 0, 4<<20)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	// waitLog waits for the log to hold s, noting the build VMs seen.
	waitLog := func(t *testing.T, id, s string, timeout time.Duration, seen map[string]bool) {
		t.Helper()
		end := time.Now().Add(timeout)
		for !strings.Contains(readLog(t, id), s) {
			for _, vm := range buildVMs(t) {
				seen[vm] = true
			}
			if time.Now().After(end) {
				t.Fatalf("build log lacks %q after %s:\n%s", s, timeout, readLog(t, id))
			}
			time.Sleep(200 * time.Millisecond)
		}
		for _, vm := range buildVMs(t) {
			seen[vm] = true
		}
	}

	t.Run("delete mid-RUN", func(t *testing.T) {
		b := startBuild(t, "sleeper", "FROM debian:12\nRUN echo started-$((40+2)) && sleep 600\n", time.Hour)
		seen := map[string]bool{}
		waitLog(t, b.ID, "started-42", 3*time.Minute, seen) // the output, not the step's header
		if len(seen) == 0 {
			t.Fatal("no build VM seen while the RUN step ran")
		}
		// As DeleteMicrovmImageVersion does: the records, then the backend.
		if err := h.st.DeleteImageVersion(ctx, testAccount, "sleeper", "1"); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := h.eng.DeleteImageVersion(ctx, testAccount, "sleeper", "1"); err != nil {
			t.Fatal(err)
		}
		dir := h.eng.ImageDir(testAccount, "sleeper", "1")
		for {
			n := h.eng.BuildsInFlight()
			_, err := os.Stat(dir)
			if n == 0 && os.IsNotExist(err) {
				break
			}
			if time.Since(start) > time.Minute {
				t.Fatalf("build still running (%d) or files still there (%v) a minute after the delete", n, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("build stopped and files removed %s after the delete", time.Since(start).Round(time.Millisecond))
		if left := buildVMs(t); len(left) > 0 {
			t.Errorf("build VMs left: %v", left)
		}
		for vm := range seen {
			if p := processesNaming(vm); len(p) > 0 {
				t.Errorf("processes of build VM %s left: %v", vm, p)
			}
			if _, err := os.Stat(filepath.Join(netns.NetnsDir, netns.NSPrefix+vm)); err == nil {
				t.Errorf("network namespace of build VM %s left", vm)
			}
		}
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(mounts), imgData) {
			t.Errorf("mounts under the image builder's folder left:\n%s", mounts)
		}
		if ents, _ := os.ReadDir(filepath.Join(imgData, "tmp")); len(ents) > 0 {
			t.Errorf("build work folders left: %v", ents)
		}
		if h.eng.BuildCommittedMiB(b.ID) != 0 {
			t.Errorf("the cancelled build still holds host memory")
		}
	})

	t.Run("RUN yes stops at the log cap and the deadline", func(t *testing.T) {
		const other = "210987654321"
		now := time.Now().UTC()
		if err := h.st.CreateImage(ctx, store.Image{Account: other, Name: testImage, State: store.ImageCreated, LatestVersion: "1", LatestActiveVersion: "1", CreatedAt: now, UpdatedAt: now},
			store.ImageVersion{Account: other, ImageName: testImage, Version: "1", State: store.VersionSuccessful, Status: store.VersionActive, CreatedAt: now, UpdatedAt: now}, nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := h.eng.SetTemplate(other, testImage, "1", fx.Template); err != nil {
			t.Fatal(err)
		}
		var lat []time.Duration
		runOther := func(i int) {
			now := time.Now().UTC()
			m := store.Microvm{ID: fmt.Sprintf("mvm-%08xq%d", os.Getpid(), i), Account: other, State: store.StatePending, ImageName: testImage, ImageVersion: "1",
				MaximumDurationInSeconds: 600, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(10 * time.Minute)}
			if err := h.st.CreateMicrovm(ctx, m, nil); err != nil {
				t.Fatal(err)
			}
			h.ids = append(h.ids, m.ID)
			start := time.Now()
			if err := h.eng.StartMicrovm(ctx, m); err != nil {
				t.Fatal(err)
			}
			for {
				got, err := h.st.GetMicrovm(ctx, other, m.ID)
				if err != nil {
					t.Fatal(err)
				}
				if got.State == store.StateRunning {
					break
				}
				if got.State == store.StateTerminated || time.Since(start) > time.Minute {
					t.Fatalf("other account's microVM: %s (%s)", got.State, got.StateReason)
				}
				time.Sleep(10 * time.Millisecond)
			}
			lat = append(lat, time.Since(start))
			h.srv.Terminate(ctx, other, m.ID, "test")
		}
		runOther(0) // with no build running, for comparison

		b := startBuild(t, "yes", "FROM debian:12\nRUN yes\n", deadline)
		seen := map[string]bool{}
		waitLog(t, b.ID, "build log truncated", deadline, seen)
		// Another account's microVM starts while the build floods its log.
		runOther(1)
		runOther(2)
		t.Logf("another account's RunMicrovm (engine start to RUNNING): %s with no build, %s and %s during the RUN yes build",
			lat[0].Round(time.Millisecond), lat[1].Round(time.Millisecond), lat[2].Round(time.Millisecond))
		if lat[2] > 15*time.Second {
			t.Errorf("another account's microVM took %s to start during a flooding build", lat[2])
		}

		var got store.Build
		end := time.Now().Add(deadline + 2*time.Minute)
		for {
			var err error
			if got, err = h.st.GetBuild(ctx, testAccount, "yes", "1", b.ID); err != nil {
				t.Fatal(err)
			}
			if got.State == store.BuildFailed || got.State == store.BuildSuccessful || time.Now().After(end) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if got.State != store.BuildFailed || !strings.Contains(got.StateReason, "BuildTimedOut") || !strings.Contains(got.StateReason, deadline.String()) {
			t.Fatalf("build %s (%q), want FAILED with BuildTimedOut after %s", got.State, got.StateReason, deadline)
		}
		log := readLog(t, b.ID)
		trunc := strings.Index(log, engine.TruncatedLine(logCap))
		if trunc != logCap {
			t.Errorf("truncated line at byte %d, want at the cap %d", trunc, logCap)
		}
		if tail := log[trunc+len(engine.TruncatedLine(logCap)):]; strings.Count(tail, "\n") > 2 || !strings.Contains(tail, "BuildTimedOut") {
			t.Errorf("after the truncated line the log holds %q; want only the outcome", tail)
		}
		t.Logf("log: %d bytes (cap %d); build ended: %s", len(log), logCap, got.StateReason)
		if left := buildVMs(t); len(left) > 0 {
			t.Errorf("build VMs left after the deadline: %v", left)
		}
		for vm := range seen {
			if p := processesNaming(vm); len(p) > 0 {
				t.Errorf("processes of build VM %s left: %v", vm, p)
			}
		}
	})
}
