//go:build linux

package base

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
)

// Resolver implements image.BaseResolver for managed bases, OCI archives
// in the build context and registry images.
type Resolver struct {
	Managed *Managed
	// InsecureRegistries ("host:port" or "host") are the operator's
	// --insecure-registry: the only registries spoken to over plain HTTP
	// and the only ones reached on an address the egress policy denies
	// (a registry on loopback).
	InsecureRegistries []string
	// Egress checks every registry connection; nil = the built-in deny
	// list. A FROM image is the tenant's choice, so its registry is too.
	Egress *egress.Policy
	// Limits bound a flattened OCI image. Zero = layer.DefaultImageLimits.
	Limits layer.Limits
	// ScratchDir holds unpacked oci-archives while a build reads them;
	// "" = os.TempDir().
	ScratchDir string
	Logger     *slog.Logger
}

var _ image.BaseResolver = (*Resolver)(nil)

func (r *Resolver) limits() layer.Limits {
	if r.Limits == (layer.Limits{}) {
		return layer.DefaultImageLimits
	}
	return r.Limits
}

func (r *Resolver) skipped(name, why string) {
	l := r.Logger
	if l == nil {
		l = slog.Default()
	}
	l.Debug("image entry skipped", "name", name, "why", why)
}

// Resolve returns the base named by b. Managed bases are built on first
// use (debootstrap, about a minute) and reused afterwards.
func (r *Resolver) Resolve(ctx context.Context, b dockerfile.Base, contextDir string) (image.ResolvedBase, error) {
	switch b.Kind {
	case dockerfile.BaseManaged:
		if r.Managed == nil {
			return image.ResolvedBase{}, fmt.Errorf("managed base %s: no managed base store configured", b.Ref)
		}
		v, err := r.Managed.Ensure(ctx, b.Ref)
		if err != nil {
			return image.ResolvedBase{}, err
		}
		return image.ResolvedBase{
			Key: "managed:" + v.Name + "@" + v.Version,
			// Built by kiln from its configured sources: one cache entry
			// serves every account.
			Shared: true,
			Config: image.Config{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, Cmd: []string{"bash"}},
			Materialize: func(ctx context.Context, dst string) error {
				return copyInto(ctx, v.Dir, dst)
			},
		}, nil
	case dockerfile.BaseOCIArchive:
		name, err := layer.CleanName(b.Ref, false)
		if err != nil {
			return image.ResolvedBase{}, fmt.Errorf("FROM oci-archive:%s: %w", b.Ref, err)
		}
		// Open through the context root so a link cannot point the
		// archive path outside the code package.
		cr, err := os.OpenRoot(contextDir)
		if err != nil {
			return image.ResolvedBase{}, err
		}
		defer cr.Close()
		if _, err := cr.Stat(name); err != nil {
			return image.ResolvedBase{}, fmt.Errorf("FROM oci-archive:%s: not in the code package: %w", b.Ref, err)
		}
		archive := filepath.Join(contextDir, filepath.FromSlash(name))
		if fi, err := cr.Lstat(name); err != nil || !fi.Mode().IsRegular() {
			return image.ResolvedBase{}, fmt.Errorf("FROM oci-archive:%s: not a regular file in the code package", b.Ref)
		}
		// Keyed by the archive's own bytes, not by the manifest digest it
		// claims (and the builder keeps it in the account's own cache).
		key, err := ArchiveKey(ctx, archive)
		if err != nil {
			return image.ResolvedBase{}, fmt.Errorf("FROM oci-archive:%s: %w", b.Ref, err)
		}
		if r.ScratchDir != "" {
			if err := os.MkdirAll(r.ScratchDir, 0o700); err != nil {
				return image.ResolvedBase{}, err
			}
		}
		scratch, err := os.MkdirTemp(r.ScratchDir, "oci-archive-")
		if err != nil {
			return image.ResolvedBase{}, err
		}
		img, err := OpenArchive(ctx, archive, scratch)
		if err != nil {
			os.RemoveAll(scratch)
			return image.ResolvedBase{}, err
		}
		return r.fromImage(img, key, func() { os.RemoveAll(scratch) })
	case dockerfile.BaseRegistry:
		img, err := Pull(ctx, b.Ref, r.InsecureRegistries, r.Egress)
		if err != nil {
			return image.ResolvedBase{}, err
		}
		d, err := img.Digest()
		if err != nil {
			return image.ResolvedBase{}, fmt.Errorf("reading image digest: %w", err)
		}
		return r.fromImage(img, "oci:"+d.String(), nil)
	}
	return image.ResolvedBase{}, fmt.Errorf("base kind %s is resolved by the builder", b.Kind)
}

// fromImage builds the ResolvedBase of an OCI image under key; release
// frees what reading it needs (an unpacked archive).
func (r *Resolver) fromImage(img v1.Image, key string, release func()) (image.ResolvedBase, error) {
	cfg, err := ConfigOf(img)
	if err != nil {
		if release != nil {
			release()
		}
		return image.ResolvedBase{}, err
	}
	return image.ResolvedBase{
		Key:    key,
		Config: cfg,
		Materialize: func(ctx context.Context, dst string) error {
			return Flatten(ctx, img, dst, r.limits(), r.skipped)
		},
		Release: release,
	}, nil
}

func copyInto(ctx context.Context, src, dst string) error {
	// cp -a keeps owners, modes, links and xattrs; "src/." copies the
	// contents into the existing dst.
	cmd := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", src+"/.", dst)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("copying base root: %s: %w", strings.TrimSpace(string(out)), err)
	}
	return nil
}
