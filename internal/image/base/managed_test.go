//go:build linux

package base

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// sharedDataDir is where the slow managed-base build is cached across test
// runs (and shared with kiln itself): KILN_DATA_DIR or /var/lib/kiln.
func sharedDataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	return "/var/lib/kiln"
}

// TestManagedDebian12 builds debian-12 with debootstrap once (about 30-60 s)
// and reuses it afterwards.
func TestManagedDebian12(t *testing.T) {
	testenv.NeedRoot(t, "debootstrap needs root")
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap not installed (make setup)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	m := &Managed{DataDir: sharedDataDir()}
	v, err := m.Ensure(ctx, Debian12)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("debian-12 version %s from %s, %d MB", v.Version, v.Mirror, v.SizeBytes>>20)
	checks := []struct {
		name, path, has string
	}{
		{"os-release says bookworm", "etc/os-release", "bookworm"},
		{"apt sources use the host's mirror", "etc/apt/sources.list.d/debian.sources", v.Mirror},
		{"no recommends", "etc/apt/apt.conf.d/90kiln", "Install-Recommends \"false\""},
		{"no translations", "etc/apt/apt.conf.d/90kiln", "Acquire::Languages \"none\""},
		{"dpkg without fsync", "etc/dpkg/dpkg.cfg.d/90kiln-unsafe-io", "force-unsafe-io"},
		{"ca-certificates installed", "etc/ssl/certs/ca-certificates.crt", "BEGIN CERTIFICATE"},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(v.Dir, c.path))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(b), c.has) {
				t.Fatalf("%s lacks %q", c.path, c.has)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(v.Dir, "usr/bin/apt-get")); err != nil {
		t.Fatal("apt-get missing:", err)
	}
	if _, err := os.Stat(filepath.Join(v.Dir, "etc/resolv.conf")); err == nil {
		t.Fatal("host resolv.conf leaked into the base")
	}
	again, err := m.Ensure(ctx, Debian12)
	if err != nil || again.Version != v.Version {
		t.Fatalf("second Ensure = %v, %v; want cached %s", again.Version, err, v.Version)
	}
	vs, err := m.Versions(Debian12)
	if err != nil || len(vs) == 0 {
		t.Fatalf("Versions = %v, %v", vs, err)
	}
}

// TestEnsurePicksCurrentRecipe: a version built by an older recipe (here
// even a newer date) is not what Ensure hands out once one of the current
// recipe exists; no debootstrap runs for that.
func TestEnsurePicksCurrentRecipe(t *testing.T) {
	m := &Managed{DataDir: t.TempDir()}
	for _, v := range []string{"20260101." + recipe + ".1", "20991231.1.1"} {
		dir := filepath.Join(m.dir(Debian12), v)
		if err := os.MkdirAll(filepath.Join(dir, "rootfs"), 0o755); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(Version{Name: Debian12, Version: v})
		if err := os.WriteFile(filepath.Join(dir, "manifest.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v, err := m.Ensure(context.Background(), Debian12)
	if err != nil || v.Version != "20260101."+recipe+".1" {
		t.Fatalf("Ensure = %q, %v; want the current recipe's version", v.Version, err)
	}
	if got := recipeOf("20991231.1.1"); got != "1" {
		t.Errorf("recipeOf = %q", got)
	}
}
