package base

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Archives come from tenants, and go-containerregistry's readers of them
// trust the names they are given: the layout reader opens
// blobs/sha256/DIGEST and uses whatever bytes it finds, and the tarball
// reader takes a docker-archive's rootfs.diff_ids as said. So a tenant
// could pair a well-known manifest with layers of its own. These checks
// hash every blob kiln will use against the digest that names it, before
// any of it is used.

// maxMetaBlob bounds what is read into memory whole: index.json,
// manifest.json, manifests, indexes and configs (real ones are kilobytes).
const maxMetaBlob = 8 << 20

// ErrDigestMismatch marks an archive whose blob does not hash to the digest
// that names it (damaged or forged).
var ErrDigestMismatch = fmt.Errorf("blob does not match its digest: %w", errdefs.ErrInvalid)

// checkBlob compares the bytes of one blob with its descriptor: digest,
// and size when the descriptor gives one.
func checkBlob(what string, want v1.Hash, wantSize int64, got v1.Hash, gotSize int64) error {
	if want.Algorithm != "sha256" {
		return fmt.Errorf("%w: %s is named by %q, not a sha256 digest; rebuild the archive with a standard tool", errdefs.ErrInvalid, what, want)
	}
	if got != want {
		return fmt.Errorf("%s (%s) hashes to %s: the archive is damaged or forged; rebuild it (docker save, skopeo copy, buildah push): %w", what, want, got, ErrDigestMismatch)
	}
	if wantSize > 0 && gotSize != wantSize {
		return fmt.Errorf("%s (%s) is %d bytes, its descriptor says %d: the archive is damaged or forged: %w", what, want, gotSize, wantSize, ErrDigestMismatch)
	}
	return nil
}

// hashStream hashes r to its end, stopping early if ctx ends.
func hashStream(ctx context.Context, r io.Reader) (v1.Hash, int64, error) {
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		if err := ctx.Err(); err != nil {
			return v1.Hash{}, n, err
		}
		m, err := r.Read(buf)
		h.Write(buf[:m])
		n += int64(m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return v1.Hash{}, n, err
		}
	}
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}, n, nil
}

func hashBytes(b []byte) (v1.Hash, int64) {
	s := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(s[:])}, int64(len(b))
}

// layoutMetaCheck returns a check, for an OCI layout unpacked in dir, that
// a metadata blob is small enough to read whole, before the layout reader
// reads it.
func layoutMetaCheck(dir string) func(what string, d v1.Descriptor) error {
	return func(what string, d v1.Descriptor) error {
		if d.Digest.Algorithm != "sha256" || !hexDigest.MatchString(d.Digest.Hex) {
			return fmt.Errorf("%w: %s is named by %q, not a sha256 digest", errdefs.ErrInvalid, what, d.Digest)
		}
		return metaFileOK(what, filepath.Join(dir, "blobs", "sha256", d.Digest.Hex))
	}
}

var hexDigest = regexp.MustCompile(`^[0-9a-f]{64}$`)

func metaFileOK(what, p string) error {
	fi, err := os.Lstat(p)
	if err != nil {
		return fmt.Errorf("%w: %s missing from the archive", errdefs.ErrInvalid, what)
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxMetaBlob {
		return fmt.Errorf("%w: %s is not a regular file of at most %d bytes", errdefs.ErrInvalid, what, maxMetaBlob)
	}
	return nil
}

// verifyLayoutImage checks an image of an OCI layout: its manifest against
// the descriptor that named it, the config against the manifest, and every
// layer's stored bytes against the manifest. Layers are then read from the
// same files, which sit in kiln's own scratch folder. meta bounds a
// metadata blob before it is read.
func verifyLayoutImage(ctx context.Context, img v1.Image, desc v1.Descriptor, meta func(string, v1.Descriptor) error) error {
	if err := meta("image manifest", desc); err != nil {
		return err
	}
	raw, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("reading manifest %s: %w", desc.Digest, err)
	}
	got, n := hashBytes(raw)
	if err := checkBlob("image manifest", desc.Digest, desc.Size, got, n); err != nil {
		return err
	}
	m, err := img.Manifest()
	if err != nil {
		return fmt.Errorf("parsing manifest %s: %w", desc.Digest, err)
	}
	if err := meta("image config", m.Config); err != nil {
		return err
	}
	if err := verifyConfig(img, m.Config); err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("reading layers: %w", err)
	}
	if len(layers) != len(m.Layers) {
		return fmt.Errorf("%w: manifest lists %d layers, %d found", errdefs.ErrInvalid, len(m.Layers), len(layers))
	}
	for i, d := range m.Layers {
		if len(d.URLs) > 0 {
			return fmt.Errorf("%w: layer %d (%s) is a foreign layer (fetched from URLs); kiln only uses layers stored in the archive", errdefs.ErrInvalid, i+1, d.Digest)
		}
		rc, err := layers[i].Compressed()
		if err != nil {
			return fmt.Errorf("reading layer %d (%s): %w", i+1, d.Digest, err)
		}
		got, n, err := hashStream(ctx, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("reading layer %d (%s): %w", i+1, d.Digest, err)
		}
		if err := checkBlob(fmt.Sprintf("layer %d", i+1), d.Digest, d.Size, got, n); err != nil {
			return err
		}
	}
	return nil
}

func verifyConfig(img v1.Image, d v1.Descriptor) error {
	raw, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("reading image config %s: %w", d.Digest, err)
	}
	got, n := hashBytes(raw)
	return checkBlob("image config", d.Digest, d.Size, got, n)
}

// verifyIndex checks a nested index's bytes against the descriptor that
// named it.
func verifyIndex(idx v1.ImageIndex, desc v1.Descriptor) error {
	raw, err := idx.RawManifest()
	if err != nil {
		return fmt.Errorf("reading image index %s: %w", desc.Digest, err)
	}
	got, n := hashBytes(raw)
	return checkBlob("image index", desc.Digest, desc.Size, got, n)
}

// configByDigest matches the config file names docker save writes:
// "HEX.json" (before docker 25) and "blobs/sha256/HEX".
var configByDigest = regexp.MustCompile(`^(?:blobs/sha256/([0-9a-f]{64})|([0-9a-f]{64})\.json)$`)

// verifyDockerArchive checks a docker-archive image: the config against
// the digest its file name gives, and every layer's content against the
// config's rootfs.diff_ids, which is what binds layers to the image (the
// image id is the config's digest). A docker-archive has no manifest
// digest of its own: the reader computes one from the content.
func verifyDockerArchive(ctx context.Context, archive string, img v1.Image, tm tarball.Manifest) error {
	raw, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("reading image config: %w", err)
	}
	if sm := configByDigest.FindStringSubmatch(path.Clean(tm[0].Config)); sm != nil {
		want := v1.Hash{Algorithm: "sha256", Hex: sm[1] + sm[2]}
		got, n := hashBytes(raw)
		if err := checkBlob("image config "+tm[0].Config, want, 0, got, n); err != nil {
			return err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("parsing image config: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("reading layers: %w", err)
	}
	if len(layers) != len(cf.RootFS.DiffIDs) || len(layers) != len(tm[0].Layers) {
		return fmt.Errorf("%w: manifest.json lists %d layers, the config %d diff_ids", errdefs.ErrInvalid, len(tm[0].Layers), len(cf.RootFS.DiffIDs))
	}
	for i, want := range cf.RootFS.DiffIDs {
		rc, err := layers[i].Uncompressed()
		if err != nil {
			return fmt.Errorf("reading layer %d (%s): %w", i+1, tm[0].Layers[i], err)
		}
		got, n, err := hashStream(ctx, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("reading layer %d (%s): %w", i+1, tm[0].Layers[i], err)
		}
		if err := checkBlob(fmt.Sprintf("layer %d (%s)", i+1, tm[0].Layers[i]), want, 0, got, n); err != nil {
			return err
		}
	}
	return nil
}

// dockerManifest reads a docker-archive's manifest.json, refusing it, or
// the config it names, when either is not a regular entry of at most
// maxMetaBlob bytes: the tarball reader reads both whole.
func dockerManifest(archive string) (tarball.Manifest, error) {
	sizes := map[string]int64{}
	f, err := os.Open(archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		n := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if h.Typeflag != tar.TypeReg {
			sizes[n] = -1
		} else {
			sizes[n] = h.Size
		}
	}
	ok := func(name string) error {
		if sz, found := sizes[path.Clean(name)]; !found || sz < 0 || sz > maxMetaBlob {
			return fmt.Errorf("%w: %s is not a regular entry of at most %d bytes in the archive", errdefs.ErrInvalid, name, maxMetaBlob)
		}
		return nil
	}
	if err := ok("manifest.json"); err != nil {
		return nil, err
	}
	tm, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(archive) })
	if err != nil {
		return nil, fmt.Errorf("reading manifest.json: %w", err)
	}
	if len(tm) != 1 {
		return nil, fmt.Errorf("%w: the docker-archive holds %d images; save exactly one", errdefs.ErrInvalid, len(tm))
	}
	if err := ok(tm[0].Config); err != nil {
		return nil, err
	}
	return tm, nil
}

// ArchiveKey is the cache key of a tenant-supplied image archive: the
// sha256 of the archive's own bytes, which the tenant cannot make equal to
// another image's by claiming its digest.
func ArchiveKey(ctx context.Context, archive string) (string, error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h, _, err := hashStream(ctx, f)
	if err != nil {
		return "", fmt.Errorf("hashing image archive: %w", err)
	}
	return "archive:" + h.String(), nil
}
