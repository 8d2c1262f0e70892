// Package source fetches a user's code package (a zip or a folder holding
// a Dockerfile and the app's files) into a fresh build folder.
//
// A package may come from a local path, a file:// URI, an http(s):// URL,
// s3://bucket/key on an S3-compatible store, or kiln-upload://ACCOUNT/SHA256.zip
// (an upload kept in kiln's store, in a cluster). Whatever the origin, the
// bytes are untrusted: downloads are bounded in size and time, and
// unpacking goes through internal/image/layer, which never writes outside
// the build folder and enforces entry and size limits.
package source

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// ErrInvalid marks a source location kiln cannot use (unknown scheme,
// missing file, neither zip nor folder).
var ErrInvalid = fmt.Errorf("invalid code source: %w", errdefs.ErrInvalid)

// Config bounds and configures fetching.
type Config struct {
	// Limits bound the unpacked package (entries, bytes).
	Limits layer.Limits
	// MaxDownloadBytes bounds a downloaded zip (http, s3). 0 = 1 GiB.
	MaxDownloadBytes int64
	// Timeout bounds one download. 0 = 10 minutes.
	Timeout time.Duration
	// HTTPClient is used for http(s) sources. It must dial through
	// internal/egress (the URL is the tenant's); nil = the built-in deny
	// list's client with Timeout.
	HTTPClient *http.Client
	// S3 configures s3:// sources; nil refuses them.
	S3 *S3Config
	// AllowLocal permits local paths and file:// URIs. The API sets it
	// only for operators, since a tenant must not read the host's files.
	AllowLocal bool
	// Uploads opens kiln-upload://ACCOUNT/SHA256.zip packages (the store's
	// uploads, in a cluster); nil refuses them.
	Uploads UploadOpener
	// Account is whom the package is fetched for: a kiln-upload:// URI
	// of another account is refused, whoever asks.
	Account string
}

// UploadOpener opens an account's uploaded package by its SHA-256
// (store.Uploads.OpenUpload does).
type UploadOpener interface {
	OpenUpload(ctx context.Context, account, sha256 string) (io.ReadCloser, store.Upload, error)
}

func (c Config) maxDownload() int64 {
	if c.MaxDownloadBytes > 0 {
		return c.MaxDownloadBytes
	}
	return 1 << 30
}

func (c Config) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return 10 * time.Minute
}

// Fetch puts the package found at location into dst, which must be an
// empty existing folder. On error dst may hold part of the package; the
// caller removes it.
func Fetch(ctx context.Context, location, dst string, cfg Config) error {
	if cfg.Limits == (layer.Limits{}) {
		cfg.Limits = layer.DefaultSourceLimits
	}
	u, err := url.Parse(location)
	if err != nil || u.Scheme == "" || len(u.Scheme) == 1 {
		// A bare path (or a Windows drive letter, which is not ours).
		return fetchLocal(ctx, location, dst, cfg)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return fmt.Errorf("%w: file URI %q names a remote host", ErrInvalid, location)
		}
		return fetchLocal(ctx, u.Path, dst, cfg)
	case "http", "https":
		return fetchDownload(ctx, dst, cfg, func(ctx context.Context, w io.Writer) error {
			return downloadHTTP(ctx, location, w, cfg)
		})
	case store.UploadScheme:
		return fetchUpload(ctx, location, dst, cfg)
	case "s3":
		if cfg.S3 == nil {
			return fmt.Errorf("%w: %s: no S3 endpoint is configured (set kiln's s3 endpoint and keys)", ErrInvalid, location)
		}
		bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
		if bucket == "" || key == "" {
			return fmt.Errorf("%w: %q: want s3://bucket/key", ErrInvalid, location)
		}
		return fetchDownload(ctx, dst, cfg, func(ctx context.Context, w io.Writer) error {
			return downloadS3(ctx, *cfg.S3, bucket, key, w, cfg.maxDownload())
		})
	}
	return fmt.Errorf("%w: scheme %q in %q (use a path, file://, http(s):// or s3://)", ErrInvalid, u.Scheme, location)
}

// fetchUpload reads an upload out of the store, only for its own account,
// and checks that what it read hashes to the name: the store's bytes pass
// through other hosts and a database, and the name is the promise.
func fetchUpload(ctx context.Context, location, dst string, cfg Config) error {
	account, sum, err := store.ParseUploadURI(location)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if cfg.Uploads == nil {
		return fmt.Errorf("%w: %s: this builder has no access to the store's uploads", ErrInvalid, location)
	}
	if account != cfg.Account {
		return fmt.Errorf("%w: %s is another account's upload", ErrInvalid, location)
	}
	return fetchDownload(ctx, dst, cfg, func(ctx context.Context, w io.Writer) error {
		rc, up, err := cfg.Uploads.OpenUpload(ctx, account, sum)
		if err != nil {
			if errors.Is(err, errdefs.ErrNotFound) {
				return fmt.Errorf("%w: %s is gone (unused uploads are removed after a while): upload the package again", ErrInvalid, location)
			}
			return err
		}
		defer rc.Close()
		h := sha256.New()
		if err := copyBounded(io.MultiWriter(w, h), rc, up.SizeBytes, cfg.maxDownload()); err != nil {
			return err
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != sum {
			return fmt.Errorf("%s: the stored bytes hash to %s: the upload is damaged; upload the package again", location, got)
		}
		return nil
	})
}

func fetchLocal(ctx context.Context, p, dst string, cfg Config) error {
	if !cfg.AllowLocal {
		return fmt.Errorf("%w: local paths are not allowed for this caller (%s)", ErrInvalid, p)
	}
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if fi.IsDir() {
		return copyFolder(ctx, p, dst, cfg)
	}
	return unzip(ctx, p, dst, cfg)
}

// copyFolder copies a local folder with the same checks as a zip: links
// that leave the folder and special files are refused, so a folder source
// cannot smuggle host files into the image.
func copyFolder(ctx context.Context, src, dst string, cfg Config) error {
	sr, err := os.OpenRoot(src)
	if err != nil {
		return fmt.Errorf("opening source folder: %w", err)
	}
	defer sr.Close()
	dr, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("opening build folder: %w", err)
	}
	defer dr.Close()
	if err := layer.CopyTree(ctx, sr, ".", dr, ".", layer.CopyOptions{Options: layer.Options{Limits: cfg.Limits}}); err != nil {
		return fmt.Errorf("copying source folder %s: %w", src, err)
	}
	return nil
}

func unzip(ctx context.Context, zipPath, dst string, cfg Config) error {
	if err := layer.ExtractZip(ctx, zipPath, dst, layer.Options{Limits: cfg.Limits}); err != nil {
		if strings.Contains(err.Error(), "zip: not a valid zip file") {
			return fmt.Errorf("%w: %s is neither a folder nor a zip archive", ErrInvalid, zipPath)
		}
		return fmt.Errorf("unpacking code package: %w", err)
	}
	return nil
}

// fetchDownload downloads into a temporary file beside dst (never inside
// it, so the zip does not end up in the build context), then unpacks.
func fetchDownload(ctx context.Context, dst string, cfg Config, get func(context.Context, io.Writer) error) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout())
	defer cancel()
	f, err := os.CreateTemp(filepath.Dir(filepath.Clean(dst)), ".download-*.zip")
	if err != nil {
		return fmt.Errorf("creating download file: %w", err)
	}
	defer os.Remove(f.Name())
	err = get(ctx, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("downloading code package: timed out after %s: %w", cfg.timeout(), err)
		}
		return fmt.Errorf("downloading code package: %w", err)
	}
	return unzip(ctx, f.Name(), dst, cfg)
}

func downloadHTTP(ctx context.Context, location string, w io.Writer, cfg Config) error {
	client := cfg.HTTPClient
	if client == nil {
		client = (&egress.Policy{}).Client(cfg.timeout())
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, location, nil)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return egress.Tenant(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", redact(location), resp.Status)
	}
	return copyBounded(w, resp.Body, resp.ContentLength, cfg.maxDownload())
}

// copyBounded copies at most max bytes, failing early on a declared length
// over the limit and late on a body that runs past it.
func copyBounded(w io.Writer, r io.Reader, declared, max int64) error {
	if declared > max {
		return fmt.Errorf("%w: package is %d bytes, over MaxDownloadBytes = %d; shrink it or raise the limit", layer.ErrLimit, declared, max)
	}
	n, err := io.Copy(w, io.LimitReader(r, max+1))
	if err != nil {
		return err
	}
	if n > max {
		return fmt.Errorf("%w: package is over MaxDownloadBytes = %d; shrink it or raise the limit", layer.ErrLimit, max)
	}
	return nil
}

// redact drops a URL's query (often a presigned signature) from messages.
func redact(location string) string {
	u, err := url.Parse(location)
	if err != nil {
		return "(unparsable URL)"
	}
	u.RawQuery, u.User = "", nil
	return u.String()
}
