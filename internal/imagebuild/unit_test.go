//go:build linux

package imagebuild

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMergeEnv(t *testing.T) {
	tests := []struct {
		name string
		base []string
		over map[string]string
		want []string
	}{
		{name: "none", base: []string{"PATH=/bin", "A=1"}, want: []string{"PATH=/bin", "A=1"}},
		{name: "override keeps order", base: []string{"A=1", "B=2"}, over: map[string]string{"A": "x"}, want: []string{"A=x", "B=2"}},
		{name: "new keys sorted after", base: []string{"A=1"}, over: map[string]string{"Z": "z", "M": "m"}, want: []string{"A=1", "M=m", "Z=z"}},
		{name: "value with equals", base: nil, over: map[string]string{"Q": "a=b"}, want: []string{"Q=a=b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MergeEnv(tt.base, tt.over); !slices.Equal(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestPruneTemplateCache(t *testing.T) {
	top := t.TempDir()
	dir := filepath.Join(top, "accounts", "0123456789abcdef0123456789abcdef")
	old := time.Now().Add(-48 * time.Hour)
	// An entry of the unscoped layout: nobody's, so never reused again.
	os.MkdirAll(filepath.Join(top, "legacykey"), 0o700)
	os.WriteFile(filepath.Join(top, "legacykey", "complete"), nil, 0o600)
	mk := func(name string, complete bool, at time.Time) {
		p := filepath.Join(dir, name)
		os.MkdirAll(p, 0o700)
		if complete {
			os.WriteFile(filepath.Join(p, "complete"), nil, 0o600)
			os.Chtimes(filepath.Join(p, "complete"), at, at)
		}
		os.Chtimes(p, at, at)
	}
	mk("fresh", true, time.Now())
	mk("stale", true, old)
	mk("broken", false, time.Now())
	mk(".tmp-new", false, time.Now())
	mk(".tmp-old", false, old)
	n, err := PruneTemplateCache(top, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if want := []string{".tmp-new", "fresh"}; n != 4 || !slices.Equal(left, want) {
		t.Errorf("removed %d, left %v; want 4 removed, %v left", n, left, want)
	}
	if _, err := os.Stat(filepath.Join(top, "legacykey")); err == nil {
		t.Error("unscoped legacy entry kept")
	}
}

func TestMemoryFor(t *testing.T) {
	for _, tt := range []struct {
		min  int64
		want int
	}{{128, 512}, {512, 512}, {513, 1024}, {2048, 2048}, {5000, 8192}, {8192, 8192}} {
		if got, err := MemoryFor(tt.min); err != nil || got != tt.want {
			t.Errorf("MemoryFor(%d) = %d, %v; want %d", tt.min, got, err, tt.want)
		}
	}
	if _, err := MemoryFor(16384); err == nil || !strings.Contains(err.Error(), "largest microVM size, 8192 MiB") {
		t.Errorf("MemoryFor(16384): %v", err)
	}
}
