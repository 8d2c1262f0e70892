//go:build linux

package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// countingBases resolves every FROM to a tiny root and counts how often a
// base is written out (a cache miss). Managed bases are Shared, as the
// real resolver makes them; others are not.
type countingBases struct {
	mu           sync.Mutex
	materialized map[string]int
}

func (c *countingBases) Resolve(ctx context.Context, b dockerfile.Base, contextDir string) (ResolvedBase, error) {
	return ResolvedBase{
		Key:    fmt.Sprint(b.Kind) + ":" + b.Ref,
		Shared: b.Kind == dockerfile.BaseManaged,
		Config: Config{Env: []string{defaultPath}},
		Materialize: func(ctx context.Context, dst string) error {
			c.mu.Lock()
			c.materialized[b.Ref]++
			c.mu.Unlock()
			if err := os.MkdirAll(filepath.Join(dst, "etc"), 0o755); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(dst, "etc/base"), []byte(b.Ref), 0o644)
		},
	}, nil
}

// TestCachePerAccount proves that no step result crosses accounts: B
// building exactly what A built reuses nothing (its log has no "cached",
// its RUN runs again, a tenant-chosen base is written out again), while A
// rebuilding reuses everything, and only managed bases (kiln's own) are
// kept once for all.
func TestCachePerAccount(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	for _, tt := range []struct {
		name       string
		from       string
		ref        string
		baseShared bool
	}{
		{name: "managed base is shared", from: "debian:12", ref: "debian-12", baseShared: true},
		{name: "registry base is per account", from: "kiln.test/base:1", ref: "kiln.test/base:1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			data, bctx := t.TempDir(), t.TempDir()
			writeFiles(t, bctx, map[string]string{
				"Dockerfile": "FROM " + tt.from + "\nCOPY app.txt /app.txt\nRUN make\nENV A=1\n",
				"app.txt":    "secret input",
			})
			runner := &fakeRunner{fn: func(root string, step RunStep) error {
				return os.WriteFile(filepath.Join(root, "made"), []byte("made"), 0o644)
			}}
			bases := &countingBases{materialized: map[string]int{}}
			b := &Builder{DataDir: data, Runner: runner, Bases: bases, RunHeadroom: 8 << 20}
			build := func(account string) (*Result, string) {
				t.Helper()
				var log bytes.Buffer
				res, err := b.Build(ctx, Request{Account: account, ContextDir: bctx, Output: filepath.Join(t.TempDir(), "root.ext4"), Log: &log})
				if err != nil {
					t.Fatalf("build as %s: %v\nlog:\n%s", account, err, log.String())
				}
				return res, log.String()
			}

			build("111111111111")
			resB, logB := build("222222222222")
			if strings.Contains(logB, "cached") {
				t.Errorf("B's build log shows a cache hit on A's entries:\n%s", logB)
			}
			for _, s := range resB.Steps {
				if strings.HasPrefix(s.Instruction, "ENV") {
					continue // metadata steps always count as cached
				}
				if s.Cached && !(tt.baseShared && strings.HasPrefix(s.Instruction, "FROM")) {
					t.Errorf("B's step %q came from the cache", s.Instruction)
				}
			}
			if len(runner.calls) != 2 {
				t.Errorf("RUN ran %d times for two accounts, want 2", len(runner.calls))
			}
			wantBase := 2
			if tt.baseShared {
				wantBase = 1
			}
			if got := bases.materialized[tt.ref]; got != wantBase {
				t.Errorf("base written out %d times, want %d", got, wantBase)
			}

			// The same account keeps its cache.
			resA2, logA2 := build("111111111111")
			for _, s := range resA2.Steps {
				if !s.Cached {
					t.Errorf("A's rebuild: step %q not cached", s.Instruction)
				}
			}
			if !strings.Contains(logA2, "cached") || len(runner.calls) != 2 {
				t.Errorf("A's rebuild ran RUN again (%d calls) or logged no hit:\n%s", len(runner.calls), logA2)
			}

			// Folder names come from a hash, whatever the account says.
			build("../../escape")
			scopes, _ := os.ReadDir(filepath.Join(data, "image-cache", "accounts"))
			if len(scopes) != 3 {
				t.Errorf("%d account folders, want 3", len(scopes))
			}
			for _, s := range scopes {
				if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(s.Name()) {
					t.Errorf("account folder %q is not a hash", s.Name())
				}
			}
			if _, err := os.Stat(filepath.Join(data, "..", "escape")); err == nil {
				t.Error("an account name made a folder outside the cache")
			}
			checkNoWork(t, data)
		})
	}
}

func TestBuildNeedsAccount(t *testing.T) {
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{"Dockerfile": "FROM scratch\n"})
	_, err := (&Builder{DataDir: t.TempDir()}).Build(context.Background(), Request{ContextDir: bctx, Output: filepath.Join(t.TempDir(), "r.ext4")})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "account") {
		t.Fatalf("build without an account: %v, want an invalid-request error naming the account", err)
	}
}

func TestPruneCacheScoped(t *testing.T) {
	data := t.TempDir()
	old := time.Now().Add(-48 * time.Hour)
	mk := func(rel string, at time.Time) {
		p := filepath.Join(data, "image-cache", rel)
		os.MkdirAll(p, 0o700)
		os.WriteFile(filepath.Join(p, "meta.json"), nil, 0o600)
		os.Chtimes(filepath.Join(p, "meta.json"), at, at)
	}
	fresh := filepath.Join("accounts", ScopeName("a"), "fresh")
	mk(fresh, time.Now())
	mk(filepath.Join("accounts", ScopeName("a"), "stale"), old)
	mk(filepath.Join("shared", "base"), time.Now())
	mk(filepath.Join("shared", "oldbase"), old)
	mk("0123legacy", time.Now()) // the unscoped layout: nobody's, never read again
	n, err := PruneCache(data, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("removed %d, want 3", n)
	}
	for _, keep := range []string{fresh, filepath.Join("shared", "base")} {
		if _, err := os.Stat(filepath.Join(data, "image-cache", keep)); err != nil {
			t.Errorf("%s removed", keep)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "image-cache", "0123legacy")); err == nil {
		t.Error("legacy unscoped entry kept")
	}
}

// TestArgValueKeysLaterSteps: a changed ARG value makes every step after
// it miss the cache (E2B's force writes one with the build's id), the
// same value hits, and a changed LABEL keys nothing.
func TestArgValueKeysLaterSteps(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := t.TempDir()
	runner := &fakeRunner{fn: func(root string, step RunStep) error {
		return os.WriteFile(filepath.Join(root, "made"), []byte("made"), 0o644)
	}}
	b := &Builder{DataDir: data, Runner: runner, Bases: &countingBases{materialized: map[string]int{}}, RunHeadroom: 8 << 20}
	build := func(dockerfile string) {
		t.Helper()
		bctx := t.TempDir()
		writeFiles(t, bctx, map[string]string{"Dockerfile": dockerfile})
		var log bytes.Buffer
		if _, err := b.Build(ctx, Request{Account: "111111111111", ContextDir: bctx, Output: filepath.Join(t.TempDir(), "root.ext4"), Log: &log}); err != nil {
			t.Fatalf("%v\nlog:\n%s", err, log.String())
		}
	}
	for i, tt := range []struct {
		dockerfile string
		runs       int // RUN calls so far
	}{
		{"FROM debian:12\nARG KILN_E2B_BUILD=\"b1\"\nRUN make\n", 1},
		{"FROM debian:12\nARG KILN_E2B_BUILD=\"b1\"\nRUN make\n", 1},
		{"FROM debian:12\nARG KILN_E2B_BUILD=\"b2\"\nRUN make\n", 2},
		{"FROM debian:12\nLABEL a=1\nARG KILN_E2B_BUILD=\"b2\"\nRUN make\n", 2},
	} {
		build(tt.dockerfile)
		if len(runner.calls) != tt.runs {
			t.Fatalf("build %d (%q): RUN ran %d times in all, want %d", i, tt.dockerfile, len(runner.calls), tt.runs)
		}
	}
}
