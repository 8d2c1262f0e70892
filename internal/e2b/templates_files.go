package e2b

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Uploads of a template's COPY files: the SDK asks whether kiln has the
// files of a hash (GET /templates/{id}/files/{hash}) and PUTs a tar(.gz)
// to the URL kiln answers. The URL carries an HMAC token naming the
// account, the hash and an expiry, so it is the authentication (the SDK
// sends no API key to it), and it only ever writes that account's file of
// that hash. Files live in TemplatesDir/files/ACCOUNT/HASH.tar, or in the
// store (Config.TemplateFiles) on a cluster's control. Each use (the SDK
// finding them present, a build reading them) renews their time, and
// garbage collection (internal/gc) removes files unused for
// Config.FilesMaxAge, so an account at its bound frees itself.

const (
	uploadPrefix   = "/templates/uploads/"
	uploadTokenTTL = time.Hour
	// DefaultMaxUploadBytes bounds one upload; DefaultMaxAccountUploads
	// all of an account's kept uploads together.
	DefaultMaxUploadBytes     = 1 << 30
	DefaultMaxAccountUploads  = 4 << 30
	uploadTokenPrefix         = "ktu1."
	uploadTimeoutBase         = time.Minute
	maxTemplatePackageEntries = 100_000
)

// uploadKey derives the upload token key from the envd key, so the two
// kinds of token never stand for each other.
func (s *Server) uploadKey() []byte {
	m := hmac.New(sha256.New, s.cfg.Tokens.key)
	m.Write([]byte("kiln e2b template upload token v1"))
	return m.Sum(nil)
}

func (s *Server) uploadMAC(payload string) []byte {
	m := hmac.New(sha256.New, s.uploadKey())
	m.Write([]byte(payload))
	return m.Sum(nil)
}

// mintUpload returns the token of an upload of hash for account.
func (s *Server) mintUpload(account, hash string, exp time.Time) string {
	payload := account + "." + hash + "." + strconv.FormatInt(exp.Unix(), 10)
	return uploadTokenPrefix + payload + "." + base64.RawURLEncoding.EncodeToString(s.uploadMAC(payload))
}

// checkUpload returns the account and hash a token stands for.
func (s *Server) checkUpload(tok string) (account, hash string, ok bool) {
	rest, found := strings.CutPrefix(tok, uploadTokenPrefix)
	if !found || len(rest) > 256 {
		return "", "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 4 {
		return "", "", false
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[3])
	if err != nil || !hmac.Equal(sig, s.uploadMAC(strings.Join(parts[:3], "."))) {
		return "", "", false
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil || s.cfg.Now().Unix() > exp {
		return "", "", false
	}
	return parts[0], parts[1], true
}

// FilesDir is where one host keeps the template files of templatesDir
// (ACCOUNT/HASH.tar), for garbage collection.
func FilesDir(templatesDir string) string { return filepath.Join(templatesDir, "files") }

func (s *Server) filesPath(account, hash string) string {
	return filepath.Join(FilesDir(s.cfg.TemplatesDir), account, hash+".tar")
}

// errNotUploaded is openFiles' answer when the account has no files of
// the hash.
var errNotUploaded = errors.New("template files not uploaded")

// openFiles opens the account's files of hash, from the store or the
// folder; errNotUploaded when there are none.
func (s *Server) openFiles(ctx context.Context, account, hash string) (io.ReadCloser, error) {
	if s.cfg.TemplateFiles != nil {
		rc, _, err := s.cfg.TemplateFiles.OpenTemplateFile(ctx, account, hash)
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil, errNotUploaded
		}
		return rc, err
	}
	f, err := os.Open(s.filesPath(account, hash))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNotUploaded
	}
	return f, err
}

// useFiles renews the account's files of hash, whose time garbage
// collection judges them by; errNotUploaded when there are none. The
// touch holds References, so GC (deciding under them) either removed the
// files first, and they are not present, or sees the new time: files are
// never answered present and then removed. (In the store, GC's delete is
// conditional on the time instead.)
func (s *Server) useFiles(ctx context.Context, account, hash string) error {
	now := s.cfg.Now()
	if s.cfg.TemplateFiles != nil {
		err := s.cfg.TemplateFiles.TouchTemplateFile(ctx, account, hash, now)
		if errors.Is(err, errdefs.ErrNotFound) {
			return errNotUploaded
		}
		return err
	}
	release := s.cfg.References.Hold()
	defer release()
	err := os.Chtimes(s.filesPath(account, hash), now, now)
	if errors.Is(err, os.ErrNotExist) {
		return errNotUploaded
	}
	return err
}

// fileUploadLink is GET /templates/{templateID}/files/{hash}.
func (s *Server) fileUploadLink(ctx context.Context, q *request) (int, any, error) {
	if err := s.templatesOn(); err != nil {
		return 0, nil, err
	}
	hash := q.r.PathValue("hash")
	if !filesHashRE.MatchString(hash) {
		return 0, nil, errorf(400, "files hash %q must be the lower-case hex SHA-256 the SDK computes", hash)
	}
	if !templateNameRE.MatchString(q.r.PathValue("templateID")) {
		return 0, nil, errorf(404, "template %q not found", q.r.PathValue("templateID"))
	}
	// Present renews the files: the SDK skips the upload and the build
	// that follows must still find them.
	present := false
	if err := s.useFiles(ctx, q.key.Account, hash); err == nil {
		present = true
	} else if !errors.Is(err, errNotUploaded) {
		return 0, nil, err
	}
	scheme := "http"
	if q.r.TLS != nil {
		scheme = "https"
	}
	u := url.URL{Scheme: scheme, Host: q.r.Host, Path: uploadPrefix + s.mintUpload(q.key.Account, hash, s.cfg.Now().Add(uploadTokenTTL))}
	return 201, map[string]any{"present": present, "url": u.String()}, nil
}

// accountUploadBytes sums the account's kept uploads.
func (s *Server) accountUploadBytes(ctx context.Context, account string) (int64, error) {
	var n int64
	if s.cfg.TemplateFiles != nil {
		files, err := s.cfg.TemplateFiles.ListTemplateFiles(ctx, account)
		for _, f := range files {
			n += f.SizeBytes
		}
		return n, err
	}
	// Files still arriving count by what they hold (s.uploading). A
	// folder that cannot be read counts as empty, as it always has.
	n, _ = inflight.StoredBytes(filepath.Join(s.cfg.TemplatesDir, "files", account))
	return n, nil
}

// filesExpiry tells a tenant at the bound how space comes back.
func (s *Server) filesExpiry() string {
	raise := "an operator may raise the bound (kiln server --template-files-max-account-bytes)"
	d := s.cfg.FilesMaxAge
	if d <= 0 {
		return "this server removes no template files (its garbage collection is off); " + raise
	}
	age := d.String()
	if d%(24*time.Hour) == 0 {
		age = fmt.Sprintf("%d days", d/(24*time.Hour))
	}
	return "template files that no build or files check (GET /templates/{templateID}/files/{hash}) used for " + age +
		" are removed, freeing their bytes; or " + raise
}

// uploadFiles is PUT /templates/uploads/{token}: a tar, plain or
// compressed, of a COPY step's files. It is kept as sent, bounded in
// size, and unpacked (by internal/image/layer's rules) only into a build's
// code package.
func (s *Server) uploadFiles(w http.ResponseWriter, r *http.Request) {
	if s.cfg.TemplatesDir == "" {
		writeError(w, errorf(501, "this kiln server builds no E2B templates"))
		return
	}
	account, hash, ok := s.checkUpload(r.PathValue("token"))
	if !ok {
		writeError(w, errorf(401, "upload URL is invalid or expired: ask for a new one (GET /templates/{templateID}/files/{hash})"))
		return
	}
	max := s.cfg.MaxUploadBytes
	if r.ContentLength <= 0 || r.ContentLength > max {
		writeError(w, errorf(413, "an upload must declare its Content-Length, at most %d bytes", max))
		return
	}
	var used int64
	errFull := errors.New("full")
	unhold, err := s.uploading.Hold(account, r.ContentLength, func(held int64) (err error) {
		if used, err = s.accountUploadBytes(r.Context(), account); err != nil {
			return err
		}
		if used += held; used+r.ContentLength > s.cfg.MaxAccountUploadBytes {
			return errFull
		}
		return nil
	})
	if err == errFull {
		writeError(w, errorf(429, "the account keeps %d bytes of template files (uploads in progress included); this upload would pass its %d bytes: %s",
			used, s.cfg.MaxAccountUploadBytes, s.filesExpiry()))
		return
	}
	if err != nil {
		writeError(w, errorf(500, "summing the account's template files: %v", err))
		return
	}
	defer unhold()
	rc := http.NewResponseController(w)
	d := time.Now().Add(uploadTimeoutBase + time.Duration(r.ContentLength>>20)*time.Second)
	rc.SetReadDeadline(d)
	rc.SetWriteDeadline(d.Add(time.Minute))
	if s.cfg.TemplateFiles != nil {
		s.putFilesInStore(w, r, account, hash, unhold)
		return
	}
	dir := filepath.Dir(s.filesPath(account, hash))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		writeError(w, errorf(500, "creating upload folder: %v", err))
		return
	}
	f, err := os.CreateTemp(dir, inflight.TempPrefix+"*")
	if err != nil {
		writeError(w, errorf(500, "creating upload: %v", err))
		return
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, io.LimitReader(r.Body, r.ContentLength+1))
	if err != nil || n != r.ContentLength {
		writeError(w, errorf(400, "the body does not match its Content-Length (%d bytes read): %v", n, err))
		return
	}
	head := make([]byte, 512)
	m, _ := f.ReadAt(head, 0)
	if !layer.IsArchive(head[:m]) {
		writeError(w, errorf(400, "template files must be a tar archive, plain or gzip-compressed, as the SDK sends"))
		return
	}
	if err := f.Sync(); err != nil {
		writeError(w, errorf(500, "writing upload: %v", err))
		return
	}
	err = os.Rename(f.Name(), s.filesPath(account, hash))
	unhold() // stored, it counts as a file
	if err != nil {
		writeError(w, errorf(500, "storing upload: %v", err))
		return
	}
	w.WriteHeader(http.StatusOK)
}

// putFilesInStore is uploadFiles' store half: the same checks, the
// archive's head before anything is written since no file is read back.
func (s *Server) putFilesInStore(w http.ResponseWriter, r *http.Request, account, hash string, unhold func()) {
	br := bufio.NewReaderSize(r.Body, 512)
	head, _ := br.Peek(512)
	if !layer.IsArchive(head) {
		writeError(w, errorf(400, "template files must be a tar archive, plain or gzip-compressed, as the SDK sends"))
		return
	}
	// The bound again, as the store records the files: uploads on other
	// control replicas are not held here.
	_, err := s.cfg.TemplateFiles.PutTemplateFile(r.Context(), account, hash, r.ContentLength, br, s.cfg.MaxAccountUploadBytes)
	unhold()
	if full := (*store.TemplateFilesFullError)(nil); errors.As(err, &full) {
		writeError(w, errorf(429, "%v: %s", full, s.filesExpiry()))
		return
	}
	if errors.Is(err, errdefs.ErrInvalid) {
		writeError(w, errorf(400, "the body does not match its Content-Length (%d bytes): %v", r.ContentLength, err))
		return
	}
	if err != nil {
		writeError(w, errorf(500, "storing upload: %v", err))
		return
	}
	w.WriteHeader(http.StatusOK)
}

// baseImage is a kiln image a template builds on (fromImage or
// fromTemplate naming one): its code package, whose Dockerfile's last
// stage the template's steps continue.
type baseImage struct {
	name string
	dir  string // the unpacked code package
	head string // its Dockerfile
}

func (b *baseImage) dockerfile() string {
	if b == nil {
		return ""
	}
	return b.head
}

func (b *baseImage) close() {
	if b != nil {
		os.RemoveAll(b.dir)
	}
}

// kilnBase resolves fromImage to one of the account's kiln images, built
// from a code package on this host (an upload, or an operator's path).
func (s *Server) kilnBase(ctx context.Context, key store.AccessKey, ref string) (*baseImage, error) {
	noRegistry := errorf(400, "fromImage %q: kiln has no access to container registries; build from fromDebianImage('bookworm') (kiln's managed debian-12) or from one of your kiln images by name", ref)
	name, version, _ := strings.Cut(ref, ":")
	if !templateNameRE.MatchString(name) {
		return nil, noRegistry
	}
	img, found, err := s.imageOf(ctx, key, name)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, noRegistry
	}
	if version == "" {
		version = img.LatestActiveImageVersion
	}
	if version == "" {
		return nil, errorf(400, "fromImage %q: the kiln image has no active version yet; wait for its build", ref)
	}
	var v struct {
		CodeArtifact *store.CodeArtifact `json:"codeArtifact"`
	}
	if err := s.op(ctx, key, "GET", "/microvm-images/"+url.PathEscape(name)+"/versions/"+url.PathEscape(version), nil, nil, &v); err != nil {
		return nil, err
	}
	if v.CodeArtifact == nil {
		return nil, errorf(400, "fromImage %q: the kiln image has no code package to build on", ref)
	}
	p, fetchCfg := v.CodeArtifact.URI, source.Config{Limits: layer.DefaultSourceLimits, Uploads: s.cfg.Uploads, Account: key.Account}
	if owner, _, err := store.ParseUploadURI(p); err == nil {
		// An upload in the store (a cluster): the account's own only.
		if owner != key.Account || s.cfg.Uploads == nil {
			return nil, errorf(400, "fromImage %q: the kiln image's code package is not one of the account's uploads", ref)
		}
	} else {
		u, err := url.Parse(v.CodeArtifact.URI)
		if err != nil || (u.Scheme != "file" && u.Scheme != "") || !filepath.IsAbs(u.Path) {
			return nil, errorf(400, "fromImage %q: kiln builds on a kiln image only when its code package is on this host (an upload); this one is at %s", ref, v.CodeArtifact.URI)
		}
		p = filepath.Clean(u.Path)
		own := filepath.Join(s.cfg.ArtifactDir, key.Account) + string(filepath.Separator)
		// The same rule as the API's for building from a host path: the
		// account's own uploads, or any path for an operator account.
		if (s.cfg.ArtifactDir == "" || !strings.HasPrefix(p, own)) && !slices.Contains(s.cfg.Operators, key.Account) {
			return nil, errorf(400, "fromImage %q: the kiln image's code package is not one of the account's uploads", ref)
		}
		fetchCfg.AllowLocal = true
	}
	if err := os.MkdirAll(s.cfg.TemplatesDir, 0o700); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(s.cfg.TemplatesDir, ".base-")
	if err != nil {
		return nil, err
	}
	b := &baseImage{name: name, dir: dir}
	pkg := filepath.Join(dir, "pkg")
	if err := os.Mkdir(pkg, 0o755); err != nil {
		b.close()
		return nil, err
	}
	if err := source.Fetch(ctx, p, pkg, fetchCfg); err != nil {
		b.close()
		return nil, errorf(400, "fromImage %q: reading the kiln image's code package: %v", ref, err)
	}
	root, err := os.OpenRoot(pkg)
	if err != nil {
		b.close()
		return nil, err
	}
	defer root.Close()
	df, err := root.Open("Dockerfile")
	if err != nil {
		b.close()
		return nil, errorf(400, "fromImage %q: the kiln image's code package has no Dockerfile", ref)
	}
	head, err := io.ReadAll(io.LimitReader(df, 1<<20+1))
	df.Close()
	if err != nil || len(head) > 1<<20 {
		b.close()
		return nil, errorf(400, "fromImage %q: the kiln image's Dockerfile is over 1 MiB", ref)
	}
	if _, err := root.Lstat(filesDirInZip); err == nil {
		b.close()
		return nil, errorf(400, "fromImage %q: the kiln image's code package has a %s folder, which kiln's template builds use", ref, filesDirInZip)
	}
	b.head = string(head)
	return b, nil
}

// packTemplate makes the build's code package (the Dockerfile, the base
// image's package, every COPY's files under filesDirInZip/HASH) and
// stores it as the account's upload; it returns the package's URI.
func (s *Server) packTemplate(ctx context.Context, key store.AccessKey, plan templatePlan, base *baseImage) (string, error) {
	defer base.close()
	if err := os.MkdirAll(s.cfg.TemplatesDir, 0o700); err != nil {
		return "", err
	}
	work, err := os.MkdirTemp(s.cfg.TemplatesDir, ".pack-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	ctxDir := filepath.Join(work, "context")
	if base != nil {
		ctxDir = filepath.Join(base.dir, "pkg")
	} else if err := os.Mkdir(ctxDir, 0o755); err != nil {
		return "", err
	}
	limits := layer.DefaultSourceLimits
	for _, h := range plan.Hashes {
		dst := filepath.Join(ctxDir, filesDirInZip, h)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return "", err
		}
		// Renewed before it is read: a store's GC then leaves the chunks
		// alone while they are read.
		err := s.useFiles(ctx, key.Account, h)
		var f io.ReadCloser
		if err == nil {
			f, err = s.openFiles(ctx, key.Account, h)
		}
		if errors.Is(err, errNotUploaded) {
			return "", errorf(400, "the files of hash %s were not uploaded: upload them to the URL of GET /templates/{templateID}/files/%s first", h, h)
		}
		if err != nil {
			return "", err
		}
		r, err := layer.Decompress(ctx, f)
		if err == nil {
			err = layer.ExtractTar(ctx, r, dst, layer.Options{Limits: limits})
			r.Close()
		}
		f.Close()
		if err != nil {
			return "", errorf(400, "the files of hash %s: %v", h, err)
		}
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte(plan.Dockerfile), 0o644); err != nil {
		return "", err
	}
	zipPath := filepath.Join(work, "package.zip")
	if err := zipFolder(ctxDir, zipPath); err != nil {
		return "", fmt.Errorf("packing the template: %w", err)
	}
	return s.storePackage(ctx, key, zipPath)
}

// zipFolder zips a folder kiln wrote itself (an extraction that refused
// links out of it and special files), keeping modes and symbolic links.
func zipFolder(dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := zip.NewWriter(f)
	n := 0
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		if n++; n > maxTemplatePackageEntries {
			return fmt.Errorf("more than %d files", maxTemplatePackageEntries)
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := zip.FileInfoHeader(fi)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		} else {
			hdr.Method = zip.Deflate
		}
		w, err := zw.CreateHeader(hdr)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			_, err = w.Write([]byte(t))
			return err
		case fi.Mode().IsRegular():
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			defer src.Close()
			_, err = io.Copy(w, src)
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}

// storePackage uploads a code package as the account's, through the API's
// own upload (PUT api.ArtifactPath: quota, rate limit, checks).
func (s *Server) storePackage(ctx context.Context, key store.AccessKey, zipPath string) (string, error) {
	f, err := os.Open(zipPath)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	r, err := http.NewRequestWithContext(api.WithPrincipal(ctx, key), "PUT", api.ArtifactPath, f)
	if err != nil {
		return "", err
	}
	r.ContentLength = fi.Size()
	rec := &recorder{h: http.Header{}}
	s.cfg.API.SessionHandler().ServeHTTP(rec, r)
	if rec.status >= 300 {
		var e struct {
			Message string `json:"message"`
		}
		json.Unmarshal(rec.body.Bytes(), &e)
		return "", fromAPIError(rec.status, rec.h.Get("x-amzn-ErrorType"), "storing the template's code package: "+e.Message)
	}
	var out struct {
		URI string `json:"uri"`
	}
	if err := json.NewDecoder(bytes.NewReader(rec.body.Bytes())).Decode(&out); err != nil || out.URI == "" {
		return "", fmt.Errorf("storing the template's code package: unexpected answer %q", rec.body.String())
	}
	return out.URI, nil
}
