//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/rootfs"
)

func exampleDir(name string) string { return filepath.Join("..", "..", "examples", name) }

// TestExamples builds the examples in examples/ in real VMs, with internet
// egress for apt-get, and proves that a clone of each snapshot answers on
// 8080 at once with the start time of the build. python-http and
// ready-hook share their apt-get step (the step cache), and an unchanged
// rebuild of python-http reuses its snapshot (the template cache).
// go-multistage installs Debian's Go toolchain in its build stage and
// copies only the binary into the final stage. go-multistage builds side
// by side with the other two (one after the other, so that ready-hook
// finds python-http's step); the clones run afterwards.
func TestExamples(t *testing.T) {
	d := newDriver(t)
	b := newBuilder(t, d)
	b.CacheDir = filepath.Join(t.TempDir(), "templates")
	tests := []struct {
		name    string
		req     Request
		rebuild bool
		// sharedStep is a RUN instruction (prefix) the build must take
		// from the step cache.
		sharedStep string
		check      func(t *testing.T, m map[string]any)
	}{
		{
			name:    "python-http",
			req:     Request{Env: map[string]string{"STARTUP_SECONDS": "2"}},
			rebuild: true,
		},
		{
			name:       "ready-hook",
			req:        Request{Env: map[string]string{"WARMUP_SECONDS": "2"}, Hooks: Hooks{Port: 9000, Ready: true, Validate: true, ReadyTimeout: 2 * time.Minute}},
			sharedStep: "RUN --mount=type=cache,target=/var/cache/apt",
			check: func(t *testing.T, m map[string]any) {
				if m["tableSize"] != float64(100000) {
					t.Errorf("tableSize = %v: the warm-up did not run before the snapshot", m["tableSize"])
				}
			},
		},
		{
			name: "go-multistage",
			check: func(t *testing.T, m map[string]any) {
				if m["app"] != "go-multistage" {
					t.Errorf("app = %v", m["app"])
				}
			},
		},
	}
	type outcome struct {
		req Request
		res Result
		err error
		log string
	}
	results := make([]outcome, len(tests))
	build := func(i int) {
		tt := tests[i]
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		req := tt.req
		req.Account = "test"
		if req.MemoryMiB == 0 {
			req.MemoryMiB = 512
		}
		req.Source = exampleDir(tt.name)
		req.OutDir = filepath.Join(t.TempDir(), "v1")
		var log bytes.Buffer
		req.Log = &log
		res, err := b.Build(ctx, req)
		req.Log = nil
		results[i] = outcome{req, res, err, log.String()}
	}
	lanes := [][]int{{0, 1}, {2}}
	concurrently(len(lanes), func(l int) {
		for _, i := range lanes[l] {
			build(i)
		}
	})
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			req, res, err := results[i].req, results[i].res, results[i].err
			if err != nil {
				var be *Error
				if errors.As(err, &be) {
					t.Fatalf("build: %s", be.Reason)
				}
				t.Fatalf("build: %v\n%s", err, results[i].log)
			}
			shared := tt.sharedStep == ""
			for _, s := range res.Steps {
				t.Logf("  %-70.70s cached=%-5v %v", s.Instruction, s.Cached, s.Duration.Round(time.Millisecond))
				if tt.sharedStep != "" && strings.HasPrefix(s.Instruction, tt.sharedStep) && s.Cached {
					shared = true
				}
			}
			if !shared {
				t.Errorf("the step %q... was built again, not taken from the step cache", tt.sharedStep)
			}
			t.Logf("timings: %v", res.Timings)
			// The agent's resolv.conf (build VMs have DNS) must not stay.
			if _, err := rootfs.Stat(ctx, res.RootDisk, "/etc/resolv.conf"); err == nil {
				t.Error("/etc/resolv.conf from the build vm stayed in the image")
			}
			built := time.Now()
			m, took := cloneGet(t, d, res.TemplateDir)
			started := time.Unix(0, int64(m["startedAt"].(float64)*1e9))
			if !started.Before(built) {
				t.Errorf("clone's app started at %v, after the build (%v): its start-up ran again", started, built)
			}
			t.Logf("clone answered in %v: %v", took, m)
			if tt.check != nil {
				tt.check(t, m)
			}
			if tt.rebuild {
				req.OutDir = filepath.Join(t.TempDir(), "v2")
				start := time.Now()
				res2, err := b.Build(ctx, req)
				if err != nil {
					t.Fatalf("rebuild: %v", err)
				}
				t.Logf("unchanged rebuild took %v (cached snapshot: %v)", time.Since(start), res2.CachedTemplate)
				if !res2.CachedTemplate {
					t.Error("unchanged rebuild did not reuse the snapshot")
				}
				// v1 may go away: v2 must not depend on its files.
				os.RemoveAll(filepath.Dir(res.RootDisk))
				m2, _ := cloneGet(t, d, res2.TemplateDir)
				if m2["startedAt"] != m["startedAt"] {
					t.Errorf("clone of the rebuild started at %v, want the cached snapshot's %v", m2["startedAt"], m["startedAt"])
				}
			}
			checkClean(t, d, "")
		})
	}
}
