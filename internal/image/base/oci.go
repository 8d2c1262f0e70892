package base

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
)

// platform is the one kiln builds for: the host's.
var platform = v1.Platform{OS: "linux", Architecture: runtime.GOARCH}

// OpenArchive reads an image from an oci-archive (a tarred OCI image
// layout, with index.json) or a docker-archive (docker save, with
// manifest.json). Layout archives are unpacked into scratch, a folder the
// caller removes, through the same checks as a code package, and with no
// symbolic links: the layout reader opens blobs by plain path, and a layout
// has none. Every blob the image is made of is checked against its digest
// before OpenArchive returns (see verify.go): an archive that pairs a
// manifest with other bytes is refused.
func OpenArchive(ctx context.Context, archive, scratch string) (v1.Image, error) {
	isLayout, err := tarHas(archive, "index.json")
	if err != nil {
		return nil, fmt.Errorf("reading image archive %s: %w", filepath.Base(archive), err)
	}
	if !isLayout {
		tm, err := dockerManifest(archive)
		if err != nil {
			return nil, fmt.Errorf("reading docker-archive %s: %w", filepath.Base(archive), err)
		}
		img, err := tarball.ImageFromPath(archive, nil)
		if err != nil {
			return nil, fmt.Errorf("reading docker-archive %s: %w", filepath.Base(archive), err)
		}
		if err := verifyDockerArchive(ctx, archive, img, tm); err != nil {
			return nil, fmt.Errorf("docker-archive %s: %w", filepath.Base(archive), err)
		}
		return img, nil
	}
	f, err := os.Open(archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := layer.ExtractTar(ctx, f, scratch, layer.Options{Limits: layer.DefaultImageLimits, NoSymlinks: true}); err != nil {
		return nil, fmt.Errorf("unpacking oci-archive %s: %w", filepath.Base(archive), err)
	}
	if err := metaFileOK("index.json", filepath.Join(scratch, "index.json")); err != nil {
		return nil, fmt.Errorf("oci-archive %s: %w", filepath.Base(archive), err)
	}
	idx, err := layout.ImageIndexFromPath(scratch)
	if err != nil {
		return nil, fmt.Errorf("reading oci-archive %s: %w", filepath.Base(archive), err)
	}
	meta := layoutMetaCheck(scratch)
	img, desc, err := pickImage(idx, 0, meta)
	if err != nil {
		return nil, fmt.Errorf("oci-archive %s: %w", filepath.Base(archive), err)
	}
	if err := verifyLayoutImage(ctx, img, desc, meta); err != nil {
		return nil, fmt.Errorf("oci-archive %s: %w", filepath.Base(archive), err)
	}
	return img, nil
}

// pickImage returns the image for the host's platform from an index
// (nested indexes followed, each checked against its digest), or its only
// image, with the descriptor that named it. meta bounds an index's blob
// before it is read.
func pickImage(idx v1.ImageIndex, depth int, meta func(string, v1.Descriptor) error) (v1.Image, v1.Descriptor, error) {
	if depth > 4 {
		return nil, v1.Descriptor{}, errors.New("image index nested too deeply")
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, v1.Descriptor{}, err
	}
	var fallback *v1.Descriptor
	for i := range im.Manifests {
		d := im.Manifests[i]
		matches := d.Platform == nil || (d.Platform.OS == platform.OS && d.Platform.Architecture == platform.Architecture)
		switch {
		case d.MediaType.IsImage() && matches && d.Platform != nil:
			img, err := idx.Image(d.Digest)
			return img, d, err
		case d.MediaType.IsImage() && matches && fallback == nil:
			fallback = &im.Manifests[i]
		case d.MediaType.IsIndex():
			if err := meta("image index", d); err != nil {
				return nil, v1.Descriptor{}, err
			}
			sub, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, v1.Descriptor{}, err
			}
			if err := verifyIndex(sub, d); err != nil {
				return nil, v1.Descriptor{}, err
			}
			if img, sd, err := pickImage(sub, depth+1, meta); err == nil {
				return img, sd, nil
			}
		}
	}
	if fallback != nil {
		img, err := idx.Image(fallback.Digest)
		return img, *fallback, err
	}
	return nil, v1.Descriptor{}, fmt.Errorf("no image for %s/%s in the archive", platform.OS, platform.Architecture)
}

func tarHas(archive, want string) (bool, error) {
	f, err := os.Open(archive)
	if err != nil {
		return false, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if strings.TrimPrefix(h.Name, "./") == want {
			return true, nil
		}
	}
}

// Pull fetches ref from its registry through pol (nil = the built-in
// deny list): every connection, redirects to blob stores included, is
// checked, and no proxy from the environment is used. Registries named in
// insecure ("host:port" or "host", the operator's --insecure-registry) are
// the only ones spoken to over plain HTTP and the only ones reached on a
// denied address (loopback, say).
func Pull(ctx context.Context, ref string, insecure []string, pol *egress.Policy) (v1.Image, error) {
	opts := []name.Option{name.WeakValidation}
	r0, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, fmt.Errorf("parsing image reference %q: %w", ref, err)
	}
	if isInsecure(r0.Context().RegistryStr(), insecure) {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, err
	}
	if pol == nil {
		pol = &egress.Policy{}
	}
	tr := pol.Transport(egress.TransportOptions{Trusted: insecure})
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithPlatform(platform), remote.WithTransport(tr))
	if err != nil {
		return nil, fmt.Errorf("pulling %s: %w", ref, egress.Tenant(err))
	}
	return img, nil
}

func isInsecure(host string, insecure []string) bool {
	hn := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		hn = h
	}
	for _, h := range insecure {
		if strings.EqualFold(h, host) || strings.EqualFold(h, hn) {
			return true
		}
	}
	return false
}

// Flatten writes the image's filesystem (all layers applied, whiteouts
// honoured, by go-containerregistry's mutate.Extract) into dst through
// internal/image/layer's checks.
func Flatten(ctx context.Context, img v1.Image, dst string, limits layer.Limits, skipped func(name, why string)) error {
	rc := mutate.Extract(img)
	defer rc.Close()
	err := layer.ExtractTar(ctx, rc, dst, layer.Options{Rootfs: true, KeepOwners: true, Limits: limits, Skipped: skipped})
	if err != nil {
		return fmt.Errorf("flattening image: %w", err)
	}
	return nil
}

// ConfigOf converts an OCI image config into kiln's.
func ConfigOf(img v1.Image) (image.Config, error) {
	cf, err := img.ConfigFile()
	if err != nil {
		return image.Config{}, fmt.Errorf("reading image config: %w", err)
	}
	c := cf.Config
	out := image.Config{
		Env:        append([]string(nil), c.Env...),
		User:       c.User,
		WorkingDir: c.WorkingDir,
		Entrypoint: append([]string(nil), c.Entrypoint...),
		Cmd:        append([]string(nil), c.Cmd...),
		StopSignal: c.StopSignal,
		Shell:      append([]string(nil), c.Shell...),
	}
	for p := range c.ExposedPorts {
		out.ExposedPorts = append(out.ExposedPorts, p)
	}
	sort.Strings(out.ExposedPorts)
	if len(c.Labels) > 0 {
		out.Labels = map[string]string{}
		for k, v := range c.Labels {
			out.Labels[k] = v
		}
	}
	return out, nil
}
