//go:build linux

package base

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

type tf struct {
	hdr  tar.Header
	body string
}

func layerOf(t *testing.T, files []tf) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := f.hdr
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		h.Size = int64(len(f.body))
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(f.body))
	}
	tw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// testImage has two layers; the second deletes a file of the first with a
// whiteout, so flattening must honour it.
func testImage(t *testing.T) v1.Image {
	t.Helper()
	l1 := layerOf(t, []tf{
		{hdr: tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: "etc/passwd"}, body: "root:x:0:0::/root:/bin/sh\nsvc:x:500:500::/:/bin/sh\n"},
		{hdr: tar.Header{Name: "etc/group"}, body: "root:x:0:\nsvc:x:500:\n"},
		{hdr: tar.Header{Name: "usr/bin/tool", Mode: 0o4755, Uid: 0}, body: "tool"},
		{hdr: tar.Header{Name: "bin", Typeflag: tar.TypeSymlink, Linkname: "/usr/bin"}},
		{hdr: tar.Header{Name: "old.txt"}, body: "deleted later"},
		{hdr: tar.Header{Name: "home/svc/data", Uid: 500, Gid: 500}, body: "svc data"},
	})
	l2 := layerOf(t, []tf{
		{hdr: tar.Header{Name: ".wh.old.txt"}},
		{hdr: tar.Header{Name: "app/hello.txt"}, body: "from layer 2"},
	})
	img, err := mutate.AppendLayers(empty.Image, l1, l2)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = platform.OS, platform.Architecture
	cf.Config = v1.Config{
		Env:          []string{"PATH=/usr/bin:/bin", "BASE=oci"},
		Entrypoint:   []string{"/usr/bin/tool"},
		Cmd:          []string{"--serve"},
		WorkingDir:   "/app",
		User:         "svc",
		ExposedPorts: map[string]struct{}{"8080/tcp": {}},
		StopSignal:   "SIGINT",
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func tarDir(t testing.TB, dir, out string) {
	t.Helper()
	f, _ := os.Create(out)
	defer f.Close()
	tw := tar.NewWriter(f)
	defer tw.Close()
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		h, _ := tar.FileInfoHeader(fi, "")
		h.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			h.Name += "/"
		}
		tw.WriteHeader(h)
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			tw.Write(b)
		}
		return nil
	})
}

func TestResolveOCI(t *testing.T) {
	ctx := context.Background()
	img := testImage(t)
	wantDigest, _ := img.Digest()
	bctx := t.TempDir()

	// docker-archive, as docker save writes it.
	tag, _ := name.NewTag("kiln.test/base:1")
	if err := tarball.WriteToFile(filepath.Join(bctx, "docker.tar"), tag, img); err != nil {
		t.Fatal(err)
	}
	// oci-archive: an OCI image layout, tarred.
	lay := t.TempDir()
	p, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithPlatform(platform)); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(bctx, "images"), 0o755)
	tarDir(t, lay, filepath.Join(bctx, "images/oci.tar"))
	os.Symlink("/etc/hostname", filepath.Join(bctx, "escape.tar"))

	// A real registry server (go-containerregistry's), on loopback.
	reg := httptest.NewServer(registry.New())
	defer reg.Close()
	host := strings.TrimPrefix(reg.URL, "http://")
	ref, _ := name.ParseReference(host+"/apps/base:1", name.Insecure)
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}

	// The registry is on loopback: reachable only because it is named,
	// as the operator's --insecure-registry would.
	r := &Resolver{InsecureRegistries: []string{host}}
	tests := []struct {
		name   string
		base   dockerfile.Base
		errHas string
	}{
		{name: "docker-archive", base: dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "docker.tar"}},
		{name: "oci-archive", base: dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "images/oci.tar"}},
		{name: "registry", base: dockerfile.Base{Kind: dockerfile.BaseRegistry, Ref: host + "/apps/base:1"}},
		{name: "archive outside the package", base: dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "../x.tar"}, errHas: `".."`},
		{name: "archive linked outside the package", base: dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "escape.tar"}, errHas: "not in the code package"},
		{name: "missing archive", base: dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "nope.tar"}, errHas: "not in the code package"},
		{name: "missing registry image", base: dockerfile.Base{Kind: dockerfile.BaseRegistry, Ref: host + "/apps/nope:1"}, errHas: "pulling"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rb, err := r.Resolve(ctx, tt.base, bctx)
			if tt.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err = %v, want %q", err, tt.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rb.Release != nil {
				defer rb.Release()
			}
			// A registry image is named by its (verified) digest; an
			// archive by its own bytes, never by the digest it claims.
			wantKey := "oci:" + wantDigest.String()
			if tt.base.Kind == dockerfile.BaseOCIArchive {
				wantKey, _ = ArchiveKey(ctx, filepath.Join(bctx, tt.base.Ref))
			}
			if rb.Key != wantKey || rb.Shared {
				t.Fatalf("key = %s (shared %v), want %s, not shared", rb.Key, rb.Shared, wantKey)
			}
			wantCfg := image.Config{Env: []string{"PATH=/usr/bin:/bin", "BASE=oci"}, User: "svc", WorkingDir: "/app",
				Entrypoint: []string{"/usr/bin/tool"}, Cmd: []string{"--serve"}, ExposedPorts: []string{"8080/tcp"}, StopSignal: "SIGINT"}
			if !reflect.DeepEqual(rb.Config, wantCfg) {
				t.Fatalf("config = %+v", rb.Config)
			}
			dst := t.TempDir()
			if err := rb.Materialize(ctx, dst); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(filepath.Join(dst, "app/hello.txt")); string(b) != "from layer 2" {
				t.Fatalf("app/hello.txt = %q", b)
			}
			if _, err := os.Lstat(filepath.Join(dst, "old.txt")); err == nil {
				t.Fatal("whiteout not applied")
			}
			if l, _ := os.Readlink(filepath.Join(dst, "bin")); l != "/usr/bin" {
				t.Fatalf("bin -> %q", l)
			}
			fi, _ := os.Stat(filepath.Join(dst, "usr/bin/tool"))
			if fi == nil || fi.Mode()&os.ModeSetuid == 0 {
				t.Fatalf("setuid lost: %v", fi)
			}
			if os.Geteuid() == 0 {
				fi, _ := os.Stat(filepath.Join(dst, "home/svc/data"))
				if uid, _ := statIDs(fi); uid != 500 {
					t.Fatalf("owner %d, want 500", uid)
				}
			}
		})
	}
	t.Run("loopback registry not named by the operator", func(t *testing.T) {
		_, err := (&Resolver{}).Resolve(ctx, dockerfile.Base{Kind: dockerfile.BaseRegistry, Ref: host + "/apps/base:1"}, bctx)
		if !errors.Is(err, egress.ErrNotAllowed) || !strings.Contains(err.Error(), "address 127.0.0.1 is not allowed") {
			t.Fatalf("err = %v, want address not allowed", err)
		}
	})
	if ents, _ := filepath.Glob(filepath.Join(os.TempDir(), "oci-archive-*")); len(ents) > 0 {
		t.Logf("note: scratch folders present (may be from parallel runs): %v", ents)
	}
}

// TestBuildOnOCIBase builds a Dockerfile FROM an oci-archive through the
// real builder, checking that the base's config carries into the image.
func TestBuildOnOCIBase(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	img := testImage(t)
	bctx := t.TempDir()
	tag, _ := name.NewTag("kiln.test/base:1")
	if err := tarball.WriteToFile(filepath.Join(bctx, "base.tar"), tag, img); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte("FROM oci-archive:base.tar\nCOPY --chown=svc extra.txt ./\nENV EXTRA=1\nCMD [\"--other\"]\n"), 0o644)
	os.WriteFile(filepath.Join(bctx, "extra.txt"), []byte("extra"), 0o644)
	b := &image.Builder{DataDir: t.TempDir(), Bases: &Resolver{}}
	out := filepath.Join(t.TempDir(), "root.ext4")
	res, err := b.Build(ctx, image.Request{Account: "test", ContextDir: bctx, Output: out})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := rootfs.ReadFile(ctx, out, "/app/extra.txt", 1<<20); err != nil || string(got) != "extra" {
		t.Fatalf("extra.txt = %q, %v", got, err)
	}
	if os.Geteuid() == 0 {
		fi, _ := rootfs.Stat(ctx, out, "/app/extra.txt")
		if fi.UID != 500 {
			t.Fatalf("--chown=svc gave uid %d", fi.UID)
		}
	}
	if got, _ := rootfs.ReadFile(ctx, out, "/app/hello.txt", 1<<20); string(got) != "from layer 2" {
		t.Fatalf("base content missing: %q", got)
	}
	want := []string{"/usr/bin/tool", "--other"}
	if !reflect.DeepEqual(res.Config.Argv(), want) || res.Config.User != "svc" || !reflect.DeepEqual(res.Config.Env, []string{"PATH=/usr/bin:/bin", "BASE=oci", "EXTRA=1"}) {
		t.Fatalf("config = %+v", res.Config)
	}
}
