//go:build linux

package base

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
)

// evilLayerBytes is a gzipped layer that plants a backdoor.
func evilLayerBytes(t *testing.T) []byte {
	t.Helper()
	l := layerOf(t, []tf{
		{hdr: tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}},
		{hdr: tar.Header{Name: "etc/passwd"}, body: "root::0:0::/root:/bin/sh\n"},
		{hdr: tar.Header{Name: "usr/bin/tool", Mode: 0o4755}, body: "backdoor"},
	})
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeLayout writes img as an OCI layout into a fresh folder and returns
// the folder and the image's manifest.
func writeLayout(t *testing.T, img v1.Image) (string, *v1.Manifest) {
	t.Helper()
	lay := t.TempDir()
	p, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithPlatform(platform)); err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return lay, m
}

func blobPath(lay string, h v1.Hash) string {
	return filepath.Join(lay, "blobs", h.Algorithm, h.Hex)
}

// rewriteTar copies the tar at src to dst with the bodies of the entries
// named in repl replaced.
func rewriteTar(t *testing.T, src, dst string, repl map[string][]byte) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	tr, tw := tar.NewReader(in), tar.NewWriter(out)
	found := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if b, ok := repl[h.Name]; ok {
			body, found = b, found+1
			h.Size = int64(len(b))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(body)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if found != len(repl) {
		t.Fatalf("replaced %d of %d entries", found, len(repl))
	}
}

// TestForgedArchiveRefused: an archive that keeps a real image's manifest
// (so it claims that image's digest) but stores other bytes under one of
// its digests is refused before any of it is used, with an error that
// names the blob. go-containerregistry's layout reader alone accepts every
// one of these.
func TestForgedArchiveRefused(t *testing.T) {
	ctx := context.Background()
	img := testImage(t)
	evil := evilLayerBytes(t)

	// The genuine archives, for the docker-archive entries' names.
	genuine := t.TempDir()
	tag, _ := name.NewTag("kiln.test/base:1")
	if err := tarball.WriteToFile(filepath.Join(genuine, "docker.tar"), tag, img); err != nil {
		t.Fatal(err)
	}
	dm, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(filepath.Join(genuine, "docker.tar")) })
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		// forge writes the archive into bctx as base.tar.
		forge  func(t *testing.T, bctx string)
		errHas []string
	}{
		{
			name: "oci layout: other bytes under a layer's digest",
			forge: func(t *testing.T, bctx string) {
				lay, m := writeLayout(t, img)
				os.WriteFile(blobPath(lay, m.Layers[0].Digest), evil, 0o644)
				tarDir(t, lay, filepath.Join(bctx, "base.tar"))
			},
			errHas: []string{"layer 1", "hashes to", "forged"},
		},
		{
			name: "oci layout: right size, wrong bytes",
			forge: func(t *testing.T, bctx string) {
				lay, m := writeLayout(t, img)
				p := blobPath(lay, m.Layers[1].Digest)
				b, _ := os.ReadFile(p)
				b[len(b)/2] ^= 0xff
				os.WriteFile(p, b, 0o644)
				tarDir(t, lay, filepath.Join(bctx, "base.tar"))
			},
			errHas: []string{"layer 2", m0(t, img).Layers[1].Digest.String()},
		},
		{
			name: "oci layout: other config under the config's digest",
			forge: func(t *testing.T, bctx string) {
				lay, m := writeLayout(t, img)
				cf, _ := img.ConfigFile()
				cf = cf.DeepCopy()
				cf.Config.Entrypoint = []string{"/usr/bin/backdoor"}
				b, _ := json.Marshal(cf)
				os.WriteFile(blobPath(lay, m.Config.Digest), b, 0o644)
				tarDir(t, lay, filepath.Join(bctx, "base.tar"))
			},
			errHas: []string{"image config", "forged"},
		},
		{
			name: "oci layout: other manifest under the index's digest",
			forge: func(t *testing.T, bctx string) {
				lay, m := writeLayout(t, img)
				d, _ := img.Digest()
				fm := m.DeepCopy()
				fm.Layers[0].Digest = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("0", 64)}
				b, _ := json.Marshal(fm)
				os.WriteFile(blobPath(lay, d), b, 0o644)
				tarDir(t, lay, filepath.Join(bctx, "base.tar"))
			},
			errHas: []string{"image manifest", "forged"},
		},
		{
			name: "docker-archive: layer is not what the config's diff_ids say",
			forge: func(t *testing.T, bctx string) {
				rewriteTar(t, filepath.Join(genuine, "docker.tar"), filepath.Join(bctx, "base.tar"), map[string][]byte{dm[0].Layers[0]: evil})
			},
			errHas: []string{"layer 1", dm[0].Layers[0], "hashes to"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bctx := t.TempDir()
			tt.forge(t, bctx)
			scratch := t.TempDir()
			r := &Resolver{ScratchDir: scratch}
			rb, err := r.Resolve(ctx, dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: "base.tar"}, bctx)
			if err == nil {
				if rb.Release != nil {
					rb.Release()
				}
				t.Fatalf("forged archive accepted (key %s)", rb.Key)
			}
			t.Logf("refused: %v", err)
			if !errors.Is(err, errdefs.ErrInvalid) || !errors.Is(err, ErrDigestMismatch) {
				t.Errorf("err = %v, want a digest-mismatch (invalid input) error", err)
			}
			for _, w := range append(tt.errHas, "base.tar") {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q: %v", w, err)
				}
			}
			if ents, _ := os.ReadDir(scratch); len(ents) != 0 {
				t.Errorf("unpacked archive left behind: %d entries", len(ents))
			}
		})
	}
}

func m0(t *testing.T, img v1.Image) *v1.Manifest {
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestArchiveKeyIsContent: an archive's cache key follows its bytes, not
// the manifest digest it claims: two archives of one image with different
// bytes (layout and docker-archive) get different keys, an identical copy
// the same.
func TestArchiveKeyIsContent(t *testing.T) {
	ctx := context.Background()
	img := testImage(t)
	bctx := t.TempDir()
	tag, _ := name.NewTag("kiln.test/base:1")
	if err := tarball.WriteToFile(filepath.Join(bctx, "a.tar"), tag, img); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(bctx, "a.tar"))
	os.WriteFile(filepath.Join(bctx, "copy.tar"), b, 0o644)
	lay, _ := writeLayout(t, img)
	tarDir(t, lay, filepath.Join(bctx, "oci.tar"))
	keys := map[string]string{}
	for _, f := range []string{"a.tar", "copy.tar", "oci.tar"} {
		rb, err := (&Resolver{}).Resolve(ctx, dockerfile.Base{Kind: dockerfile.BaseOCIArchive, Ref: f}, bctx)
		if err != nil {
			t.Fatal(err)
		}
		rb.Release()
		if rb.Shared {
			t.Errorf("%s: a tenant's archive marked shared", f)
		}
		keys[f] = rb.Key
	}
	d, _ := img.Digest()
	if keys["a.tar"] != keys["copy.tar"] || keys["a.tar"] == keys["oci.tar"] || strings.Contains(keys["oci.tar"], d.Hex) {
		t.Errorf("keys = %v (manifest digest %s)", keys, d)
	}
}

// FuzzOpenArchive feeds arbitrary bytes as an image archive: OpenArchive
// must fail cleanly or return an image whose every blob it checked.
func FuzzOpenArchive(f *testing.F) {
	img := seedImage(f)
	dir := f.TempDir()
	tag, _ := name.NewTag("kiln.test/base:1")
	if err := tarball.WriteToFile(filepath.Join(dir, "docker.tar"), tag, img); err != nil {
		f.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "docker.tar"))
	f.Add(b)
	lay := filepath.Join(dir, "lay")
	p, err := layout.Write(lay, empty.Index)
	if err != nil {
		f.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithPlatform(platform)); err != nil {
		f.Fatal(err)
	}
	tarDir(f, lay, filepath.Join(dir, "oci.tar"))
	b, _ = os.ReadFile(filepath.Join(dir, "oci.tar"))
	f.Add(b)
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0}, 1024))
	f.Fuzz(func(t *testing.T, data []byte) {
		work := t.TempDir()
		archive := filepath.Join(work, "a.tar")
		if err := os.WriteFile(archive, data, 0o644); err != nil {
			t.Fatal(err)
		}
		scratch := filepath.Join(work, "scratch")
		os.Mkdir(scratch, 0o700)
		img, err := OpenArchive(context.Background(), archive, scratch)
		if err != nil {
			return
		}
		if _, err := ConfigOf(img); err != nil {
			t.Fatalf("verified image has no readable config: %v", err)
		}
	})
}

// seedImage is a one-layer image for fuzz seeds (testImage needs a *testing.T).
func seedImage(f *testing.F) v1.Image {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "hello", Mode: 0o644, Size: 2, Typeflag: tar.TypeReg})
	tw.Write([]byte("hi"))
	tw.Close()
	raw := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
	if err != nil {
		f.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		f.Fatal(err)
	}
	return img
}

// TestArchiveMetaBounded: metadata the readers take whole into memory
// (index.json, manifest.json) is refused past a bound instead of read.
func TestArchiveMetaBounded(t *testing.T) {
	ctx := context.Background()
	img := testImage(t)
	pad := bytes.Repeat([]byte(" "), maxMetaBlob+1)

	bctx := t.TempDir()
	lay, _ := writeLayout(t, img)
	idx, _ := os.ReadFile(filepath.Join(lay, "index.json"))
	os.WriteFile(filepath.Join(lay, "index.json"), append(idx, pad...), 0o644)
	tarDir(t, lay, filepath.Join(bctx, "oci.tar"))

	tag, _ := name.NewTag("kiln.test/base:1")
	genuine := filepath.Join(t.TempDir(), "docker.tar")
	if err := tarball.WriteToFile(genuine, tag, img); err != nil {
		t.Fatal(err)
	}
	mj, _ := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(genuine) })
	raw, _ := json.Marshal(mj)
	rewriteTar(t, genuine, filepath.Join(bctx, "docker.tar"), map[string][]byte{"manifest.json": append(raw, pad...)})

	for _, f := range []string{"oci.tar", "docker.tar"} {
		_, err := OpenArchive(ctx, filepath.Join(bctx, f), t.TempDir())
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "at most") {
			t.Errorf("%s with oversize metadata: %v", f, err)
		}
	}
}

// TestArchiveSymlinksRefused: an oci-archive whose links each stay inside
// on paper (x -> ., then x/x/.../blobs climbing as many levels) but
// together point the layout's blobs at a host folder is refused, so kiln
// never reads a host's blobs as the tenant's image.
func TestArchiveSymlinksRefused(t *testing.T) {
	ctx := context.Background()
	host, _ := writeLayout(t, testImage(t)) // the host's blobs the links aim at
	scratch := t.TempDir()
	if strings.Count(scratch, "/") > 8 {
		t.Skipf("scratch %s is deeper than the links climb", scratch)
	}
	deep := strings.Repeat("x/", 8)
	out := filepath.Join(t.TempDir(), "oci.tar")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, n := range []string{"index.json", "oci-layout"} {
		b, err := os.ReadFile(filepath.Join(host, n))
		if err != nil {
			t.Fatal(err)
		}
		tw.WriteHeader(&tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(b))})
		tw.Write(b)
	}
	tw.WriteHeader(&tar.Header{Name: "x", Typeflag: tar.TypeSymlink, Linkname: "."})
	tw.WriteHeader(&tar.Header{Name: deep + "blobs", Typeflag: tar.TypeSymlink,
		Linkname: strings.Repeat("../", 8) + strings.TrimPrefix(host, "/") + "/blobs"})
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := OpenArchive(ctx, out, scratch); err == nil || !strings.Contains(err.Error(), "may not hold symbolic links") {
		t.Fatalf("an oci-archive of links to a host folder's blobs: %v, want refused", err)
	}
}
