//go:build linux

package base

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
)

// startDebianRegistry runs Debian's docker-registry (the CNCF distribution
// registry) on a free loopback port with storage in a temp folder.
func startDebianRegistry(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("docker-registry is required in CI (make setup installs it)")
		}
		t.Skip("docker-registry not installed (run make setup)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)), 0o644)
	cmd := exec.Command(bin, "serve", cfg)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not answer on %s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestPullFromDebianRegistry(t *testing.T) {
	addr := startDebianRegistry(t)
	img := testImage(t)
	ref, err := name.ParseReference(addr+"/kiln/base:1.0", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tests := []struct {
		name string
		ref  string
	}{
		{name: "by tag", ref: addr + "/kiln/base:1.0"},
		{name: "by digest", ref: addr + "/kiln/base@" + want.String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base, err := dockerfile.ResolveBase(tt.ref, nil)
			if err != nil || base.Kind != dockerfile.BaseRegistry {
				t.Fatalf("ResolveBase(%q) = %+v, %v", tt.ref, base, err)
			}
			rb, err := (&Resolver{InsecureRegistries: []string{addr}}).Resolve(ctx, base, t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			if rb.Key != "oci:"+want.String() {
				t.Fatalf("key %s, want %s", rb.Key, want)
			}
			dst := t.TempDir()
			if err := rb.Materialize(ctx, dst); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(filepath.Join(dst, "app/hello.txt")); string(b) != "from layer 2" {
				t.Fatalf("hello.txt = %q", b)
			}
		})
	}
	// Without --insecure-registry the loopback registry is a host address
	// a tenant may not make kiln contact.
	t.Run("not named", func(t *testing.T) {
		base, _ := dockerfile.ResolveBase(addr+"/kiln/base:1.0", nil)
		_, err := (&Resolver{}).Resolve(ctx, base, t.TempDir())
		if !errors.Is(err, egress.ErrNotAllowed) {
			t.Fatalf("err = %v, want address not allowed", err)
		}
	})
}
