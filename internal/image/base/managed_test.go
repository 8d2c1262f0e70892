//go:build linux

package base

import (
	"context"
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
