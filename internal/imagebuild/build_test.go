//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// The image cache is shared by the tests of this package so that FROM
// and COPY steps common to them are done once.
var (
	sharedOnce  sync.Once
	sharedDir   string
	sharedErr   error
	testAppPath string
)

func shared(t *testing.T) (dir, app string) {
	t.Helper()
	sharedOnce.Do(func() {
		if sharedDir, sharedErr = os.MkdirTemp("", "kiln-imagebuild-test-"); sharedErr != nil {
			return
		}
		testAppPath = filepath.Join(sharedDir, "app")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", testAppPath, "./testdata/app")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			sharedErr = fmt.Errorf("building the test app: %v: %s", err, out)
		}
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return sharedDir, testAppPath
}

func cleanupShared() {
	if sharedDir != "" {
		os.RemoveAll(sharedDir)
	}
}

func newBuilder(t *testing.T, d vmm.Driver) *Builder {
	dir, _ := shared(t)
	pkgs := newPackages(t, filepath.Join(dir, "pkg-cache"))
	return &Builder{
		Packages: pkgs,
		Images: &image.Builder{
			DataDir: filepath.Join(dir, "data"),
			Runner:  &Runner{Driver: d, MemoryMiB: 512, Packages: pkgs, Logger: testLogger()},
			Bases:   &base.Resolver{Managed: &base.Managed{DataDir: kilnDataDir()}, Logger: testLogger()},
			Logger:  testLogger(),
		},
		Driver: d,
		Source: source.Config{AllowLocal: true},
		Logger: testLogger(),
	}
}

// testContext writes a code package with the test app and a Dockerfile.
func testContext(t *testing.T, dockerfile string) string {
	_, app := shared(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(app)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "app"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// cloneGet clones tmpl with a fresh network, GETs / on 8080 from the host
// and returns the decoded body and the time from Clone to the first 200.
func cloneGet(t *testing.T, d vmm.Driver, tmpl string) (map[string]any, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	id := NewID("clone")
	n, err := netns.Setup(ctx, netns.Config{ID: id})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Teardown(context.Background())
	start := time.Now()
	if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl, Net: n.Attachment()}); err != nil {
		t.Fatal(err)
	}
	defer d.Terminate(context.Background(), id)
	body, err := getUntil200(ctx, "http://"+n.GuestDial(8080)+"/", 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("app answered %q: %v", body, err)
	}
	return m, elapsed
}

// getUntil200 polls url until it answers 200 (bounded body), for at most
// timeout.
func getUntil200(ctx context.Context, url string, timeout time.Duration) ([]byte, error) {
	cl := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: netns.HostDialer(2 * time.Second).DialContext}}
	deadline := time.Now().Add(timeout)
	var last error
	attempts := 0
	defer func() {
		if attempts > 1 {
			fmt.Fprintf(os.Stderr, "GET %s: %d attempts, last error %v\n", url, attempts, last)
		}
	}()
	for time.Now().Before(deadline) {
		attempts++
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		resp, err := cl.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if resp.StatusCode == 200 && rerr == nil {
				return b, nil
			}
			last = fmt.Errorf("status %d: %s", resp.StatusCode, b)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("no 200 from %s within %s: %v", url, timeout, last)
}

// checkClean fails if the build left a VM (d nil: not checked), a
// network or its output folder.
func checkClean(t *testing.T, d *qemu.Driver, out string) {
	t.Helper()
	if d != nil {
		if vms, _ := d.List(context.Background()); len(vms) > 0 {
			t.Errorf("vms left behind: %+v", vms)
		}
	}
	checkNoNetns(t)
	if out != "" {
		if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
			ents, _ := os.ReadDir(out)
			t.Errorf("output folder %s left behind (%d entries)", out, len(ents))
		}
	}
}

// TestBuildAndClone builds images that need no internet (the test app on
// debian:12 with a RUN step, USER, WORKDIR, ENV and environmentVariables;
// the same with the ready and validate hooks; and FROM scratch), clones
// each snapshot and checks that the app answers at once with its
// build-time start, i.e. without running its start-up again.
func TestBuildAndClone(t *testing.T) {
	d := newDriver(t)
	b := newBuilder(t, d)
	tests := []struct {
		name       string
		dockerfile string
		hooks      Hooks
		env        map[string]string
		allCaps    bool
		check      func(t *testing.T, m map[string]any)
	}{
		{
			name: "debian with RUN USER WORKDIR ENV",
			dockerfile: `FROM debian:12
COPY app /usr/local/bin/app
RUN echo built-in-a-vm > /etc/built-marker
WORKDIR /srv/app
USER 65534:65534
ENV GREETING=hello EXTRA=from-dockerfile
CMD ["/usr/local/bin/app"]
`,
			env: map[string]string{"EXTRA": "from-image-config"},
			check: func(t *testing.T, m map[string]any) {
				want := map[string]any{"greeting": "hello", "extra": "from-image-config", "uid": float64(65534), "cwd": "/srv/app", "marker": "built-in-a-vm\n"}
				for k, v := range want {
					if m[k] != v {
						t.Errorf("%s = %v, want %v", k, m[k], v)
					}
				}
			},
		},
		{
			// validate answers 503 three times, then 500 unless it runs on
			// a VM restored from the snapshot: the old builder called it
			// once, before the snapshot, and failed on the first 503.
			name: "ready and validate hooks",
			dockerfile: `FROM debian:12
COPY app /usr/local/bin/app
ENV MODE=hooks HOOKS_PORT=9000 READY_AFTER=2 VALIDATE_503=3 VALIDATE_RESTORED=1
ENTRYPOINT ["/usr/local/bin/app"]
`,
			hooks: Hooks{Port: 9000, Ready: true, Validate: true, ReadyTimeout: time.Minute},
		},
		{
			// A root app without additionalOsCapabilities: neither it nor
			// its child may mount or open a raw socket (the old agent let
			// every app keep every capability).
			name:       "from scratch",
			dockerfile: "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n",
			check:      checkCaps(false),
		},
		{
			name:       "additionalOsCapabilities ALL",
			dockerfile: "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n",
			allCaps:    true,
			check:      checkCaps(true),
		},
	}
	// The builds run side by side; the clones, one case at a time after.
	type outcome struct {
		res Result
		err error
		log string
	}
	results := make([]outcome, len(tests))
	srcs := make([]string, len(tests))
	for i, tt := range tests {
		srcs[i] = testContext(t, tt.dockerfile)
	}
	concurrently(len(tests), func(i int) {
		tt := tests[i]
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
		defer cancel()
		var log bytes.Buffer
		res, err := b.Build(ctx, Request{Account: "test", Source: srcs[i], Env: tt.env, MemoryMiB: 512, Hooks: tt.hooks, AllCaps: tt.allCaps, Log: &log, OutDir: filepath.Join(t.TempDir(), "version")})
		results[i] = outcome{res, err, log.String()}
	})
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err, log := results[i].res, results[i].err, results[i].log
			if err != nil {
				var be *Error
				errors.As(err, &be)
				t.Fatalf("build: %v\nreason: %v\nlog:\n%s", err, be, log)
			}
			if !res.Template.HasNet {
				t.Error("template made without a NIC")
			}
			if !strings.Contains(log, "test app listening") {
				t.Errorf("app output not in the build log:\n%s", log)
			}
			t.Logf("timings: %v", res.Timings)
			built := time.Now()
			m, took := cloneGet(t, d, res.TemplateDir)
			started := time.Unix(0, int64(m["startedAt"].(float64)))
			if !started.Before(built) {
				t.Errorf("clone's app started at %v, after the build finished (%v): start-up ran again", started, built)
			}
			t.Logf("clone answered in %v", took)
			m2, _ := cloneGet(t, d, res.TemplateDir)
			if m2["startedAt"] != m["startedAt"] {
				t.Errorf("two clones report different start times: %v, %v", m["startedAt"], m2["startedAt"])
			}
			if m["hostname"] == m2["hostname"] {
				t.Errorf("two clones share hostname %v", m["hostname"])
			}
			if tt.check != nil {
				tt.check(t, m)
			}
			checkClean(t, d, "")
		})
	}
}

// checkCaps checks what the app (root) and a child of it may do: with
// all capabilities both mount and open raw sockets, with the default set
// neither does, and the bounding set is the default set.
func checkCaps(all bool) func(t *testing.T, m map[string]any) {
	return func(t *testing.T, m map[string]any) {
		t.Helper()
		for _, who := range []string{"caps", "childCaps"} {
			c, _ := m[who].(map[string]any)
			if c == nil {
				t.Errorf("%s missing: %v", who, m)
				continue
			}
			t.Logf("%s: %v", who, c)
			for _, what := range []string{"mount", "rawSocket"} {
				if ok := c[what] == "ok"; ok != all {
					t.Errorf("%s: %s = %v, want allowed = %v", who, what, c[what], all)
				}
			}
			if !all && c["CapBnd"] != defaultCapMask {
				t.Errorf("%s: bounding set %v, want %s", who, c["CapBnd"], defaultCapMask)
			}
			if !all && c["CapInh"] != "0000000000000000" {
				t.Errorf("%s: inheritable set %v, want empty", who, c["CapInh"])
			}
		}
	}
}

// defaultCapMask is guest.DefaultCapabilities as /proc/PID/status shows
// it: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
// NET_BIND_SERVICE SYS_CHROOT SETFCAP.
const defaultCapMask = "00000000800405fb"

// TestBuildFailures checks that each kind of failure names its step and
// ends with the last log lines, and leaves nothing behind. The builds run
// side by side (most of each is a wait for a hook's timeout, which costs
// no CPU); the checks run one case at a time afterwards.
func TestBuildFailures(t *testing.T) {
	d := newDriver(t)
	b := newBuilder(t, d)
	tests := []struct {
		name       string
		dockerfile string
		hooks      Hooks
		cancelOn   string   // cancel the build once its log shows this
		want       []string // substrings of the reason
	}{
		{
			// The ready command replaces the wait for port 8080: it runs,
			// as the app, in its WORKDIR with its ENV, until it exits 0
			// (exit 1 here says it saw both; 2 that it did not).
			name:       "ready command never exits 0",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=never WANT=yes\nWORKDIR /tmp\nLABEL " + ReadyCommandLabel + "=\"test \\\"\\$WANT\\\" = yes && test \\\"\\$(pwd)\\\" = /tmp && exit 1; exit 2\"\nCMD [\"/app\"]\n",
			// 45 s: the command must have run at least once by then, also
			// under TCG on a loaded host.
			hooks: Hooks{ReadyTimeout: 45 * time.Second},
			want:  []string{PhaseReady, "not ready within 45s (ready command", "exited 1"},
		},
		{
			name:       "ready hook never 200",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=hooks HOOKS_PORT=9000 READY_AFTER=100000\nCMD [\"/app\"]\n",
			// 30 s: the app must be up and answering 503 by then, also
			// under TCG on a loaded host with the other cases' VMs (it
			// starts through the agent's capexec step since apps get the
			// default capability set).
			hooks: Hooks{Port: 9000, Ready: true, ReadyTimeout: 30 * time.Second},
			want:  []string{PhaseReady, "not ready within 30s", "answered 503"},
		},
		{
			name:       "RUN exits non-zero",
			dockerfile: "FROM debian:12\nRUN echo about to fail; exit 7\nCMD [\"true\"]\n",
			want:       []string{"line 2", "status 7", "about to fail"},
		},
		{
			name:       "cancelled while running a step",
			dockerfile: "FROM debian:12\nRUN echo step-is-'running'; sleep 600\n",
			cancelOn:   "step-is-running",
			want:       []string{"context canceled"},
		},
		{
			name:       "app exits",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=exit\nCMD [\"/app\"]\n",
			want:       []string{PhaseReady, "exited with status 3", "test app giving up"},
		},
		{
			name:       "app never listens",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=never\nCMD [\"/app\"]\n",
			// Long enough for the app's first line to reach the log
			// tail the failure quotes, under TCG on a loaded host.
			hooks: Hooks{ReadyTimeout: 15 * time.Second},
			want:  []string{PhaseReady, "port 8080 within 15s", "test app starting"},
		},
		{
			name:       "validate fails",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=hooks HOOKS_PORT=9000 VALIDATE_STATUS=500\nCMD [\"/app\"]\n",
			hooks:      Hooks{Port: 9000, Ready: true, Validate: true},
			want:       []string{PhaseValidate, "answered 500", "validate says 500"},
		},
		{
			name:       "validate never 200",
			dockerfile: "FROM debian:12\nCOPY app /app\nENV MODE=hooks HOOKS_PORT=9000 VALIDATE_503=100000\nCMD [\"/app\"]\n",
			hooks:      Hooks{Port: 9000, Ready: true, Validate: true, ValidateTimeout: 3 * time.Second},
			want:       []string{PhaseValidate, "did not answer 200 within 3s", "answered 503"},
		},
		{
			name:       "no command",
			dockerfile: "FROM scratch\nCOPY app /app\n",
			want:       []string{"no ENTRYPOINT or CMD"},
		},
	}
	type outcome struct {
		err  error
		log  string
		took time.Duration
	}
	results := make([]outcome, len(tests))
	srcs, outs := make([]string, len(tests)), make([]string, len(tests))
	for i, tt := range tests {
		srcs[i], outs[i] = testContext(t, tt.dockerfile), filepath.Join(t.TempDir(), "version")
	}
	concurrently(len(tests), func(i int) {
		tt := tests[i]
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		var log bytes.Buffer
		var w io.Writer = &log
		if tt.cancelOn != "" {
			w = &cancelOnWrite{w: &log, marker: tt.cancelOn, cancel: cancel}
		}
		start := time.Now()
		_, err := b.Build(ctx, Request{Account: "test", Source: srcs[i], MemoryMiB: 512, Hooks: tt.hooks, Log: w, OutDir: outs[i]})
		results[i] = outcome{err: err, log: log.String(), took: time.Since(start)}
	})
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := results[i]
			var be *Error
			if !errors.As(r.err, &be) {
				t.Fatalf("err = %v, want *Error\nlog:\n%s", r.err, r.log)
			}
			for _, w := range tt.want {
				if !strings.Contains(be.Reason, w) {
					t.Errorf("reason lacks %q:\n%s", w, be.Reason)
				}
			}
			if tt.cancelOn != "" && !strings.Contains(r.log, tt.cancelOn) {
				t.Errorf("the build ended before its step ran:\n%s", r.log)
			}
			t.Logf("took %v; reason:\n%s", r.took.Round(time.Millisecond), be.Reason)
			checkClean(t, nil, outs[i])
		})
	}
	checkClean(t, d, "")
}

// buildConcurrency bounds the builds a test runs side by side: enough to
// overlap hook timeouts and VM boots, few enough that two cores still
// boot each VM well inside its timeouts.
const buildConcurrency = 4

// concurrently calls f(0) … f(n-1), at most buildConcurrency at a time,
// and returns when all have returned. f must not call t.Fatal.
func concurrently(n int, f func(i int)) {
	sem := make(chan struct{}, buildConcurrency)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f(i)
		}()
	}
	wg.Wait()
}

// cancelOnWrite passes writes on to w and calls cancel once they have
// shown marker (a marker split across writes is found too).
type cancelOnWrite struct {
	w      io.Writer
	marker string
	cancel context.CancelFunc
	mu     sync.Mutex
	seen   []byte
	done   bool
}

func (c *cancelOnWrite) Write(p []byte) (int, error) {
	c.mu.Lock()
	if !c.done {
		c.seen = append(c.seen, p...)
		if bytes.Contains(c.seen, []byte(c.marker)) {
			c.done = true
			c.cancel()
		} else if len(c.seen) > len(c.marker) {
			c.seen = c.seen[len(c.seen)-len(c.marker):]
		}
	}
	c.mu.Unlock()
	return c.w.Write(p)
}
