package api

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// ArtifactPath is kiln's extension for uploading a code package (a zip),
// used by `kiln create-microvm-image --code`: PUT the zip with its SHA-256
// in X-Amz-Content-Sha256 (signed, as S3 does); the answer's uri is the
// codeArtifact to pass to CreateMicrovmImage or UpdateMicrovmImage.
const ArtifactPath = "/kiln/v1/code-artifacts"

var sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// uploadArtifact streams an upload to ArtifactDir/ACCOUNT/SHA256.zip. The
// signature is checked before a byte is written, against the hash the
// client declared; the body must then match that hash.
func (s *Server) uploadArtifact(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("x-amzn-RequestId", newRequestID())
	if !s.acceptsUploads() {
		writeError(w, r, &Error{Status: 501, Type: "UnsupportedOperationException", Message: "this server accepts no uploads"})
		return
	}
	hash := r.Header.Get("X-Amz-Content-Sha256")
	if !sha256RE.MatchString(hash) {
		writeError(w, r, fieldError("X-Amz-Content-Sha256", nil, "Header must be the lower-case hex SHA-256 of the body"))
		return
	}
	if r.ContentLength <= 0 || r.ContentLength > s.cfg.MaxArtifactBytes {
		writeError(w, r, validation("an upload must declare its Content-Length, at most %d bytes", s.cfg.MaxArtifactBytes))
		return
	}
	key, err := s.verifier.VerifyHash(r, hash, r.ContentLength)
	if err != nil {
		if errors.Is(err, auth.ErrDenied) {
			writeError(w, r, accessDenied(err.Error()))
		} else {
			writeError(w, r, internal(err.Error()))
		}
		return
	}
	s.storeArtifact(w, r, key, hash)
}

// hasUpload says whether account has stored the package of hash ("":
// not known before the body is read). In a folder, garbage collection may
// remove an unused one between this check and the new copy's rename,
// which then adds one package unchecked; the store checks again as it
// records the put.
func (s *Server) hasUpload(ctx context.Context, account, hash string) bool {
	if hash == "" {
		return false
	}
	if s.cfg.Uploads != nil {
		rc, _, err := s.cfg.Uploads.OpenUpload(ctx, account, hash)
		if err != nil {
			return false
		}
		rc.Close()
		return true
	}
	fi, err := os.Lstat(filepath.Join(s.cfg.ArtifactDir, account, hash+".zip"))
	return err == nil && fi.Mode().IsRegular()
}

// acceptsUploads says whether uploads have somewhere to go.
func (s *Server) acceptsUploads() bool { return s.cfg.Uploads != nil || s.cfg.ArtifactDir != "" }

// storeArtifact streams r's body to ArtifactDir/ACCOUNT/SHA256.zip for
// key's account, or into the store (Config.Uploads). hash, when not
// empty, is what the body must hash to.
func (s *Server) storeArtifact(w http.ResponseWriter, r *http.Request, key store.AccessKey, hash string) {
	if !s.acceptsUploads() {
		writeError(w, r, &Error{Status: 501, Type: "UnsupportedOperationException", Message: "this server accepts no uploads"})
		return
	}
	if r.ContentLength <= 0 || r.ContentLength > s.cfg.MaxArtifactBytes {
		writeError(w, r, validation("an upload must declare its Content-Length, at most %d bytes", s.cfg.MaxArtifactBytes))
		return
	}
	if s.limits != nil && !s.limits.allow(key.Account) {
		writeError(w, r, &Error{Status: 429, Type: "ThrottlingException", Message: "rate of requests exceeded for this account", RetryAfter: 1})
		return
	}
	// A package the account already has replaces itself: it needs no
	// room, although its bytes are held while they arrive (a temporary
	// file, or chunks), so concurrent uploads still count them.
	need := r.ContentLength
	if s.hasUpload(r.Context(), key.Account, hash) {
		need = 0
	}
	var over error
	unhold, err := s.uploading.Hold(key.Account, r.ContentLength, func(held int64) error {
		q, u, err := s.storedQuota(r.Context(), key.Account)
		if err != nil {
			return err
		}
		u.StorageBytes += held
		over = q.Check(key.Account, u, store.QuotaUse{StorageBytes: need})
		return over
	})
	if over != nil {
		writeError(w, r, quotaError(over))
		return
	}
	if err != nil {
		writeError(w, r, internal(err.Error()))
		return
	}
	defer unhold()
	// The server's read and write timeouts are sized for small requests;
	// an authenticated upload gets a minute plus one second per MiB.
	rc := http.NewResponseController(w)
	d := time.Now().Add(time.Minute + time.Duration(r.ContentLength>>20)*time.Second)
	rc.SetReadDeadline(d)
	rc.SetWriteDeadline(d.Add(time.Minute))
	if s.cfg.Uploads != nil {
		s.storeUpload(w, r, key, hash, unhold)
		return
	}
	dir := filepath.Join(s.cfg.ArtifactDir, key.Account)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		writeError(w, r, internal(fmt.Sprintf("creating artifact directory: %v", err)))
		return
	}
	f, err := os.CreateTemp(dir, inflight.TempPrefix+"*")
	if err != nil {
		writeError(w, r, internal(fmt.Sprintf("creating upload: %v", err)))
		return
	}
	defer os.Remove(f.Name())
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r.Body, r.ContentLength+1))
	if err != nil {
		writeError(w, r, validation("reading upload: %v", err))
		return
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if n != r.ContentLength || (hash != "" && sum != hash) {
		writeError(w, r, validation("the body does not match its Content-Length and X-Amz-Content-Sha256"))
		return
	}
	hash = sum
	magic := make([]byte, 4)
	if _, err := f.ReadAt(magic, 0); err != nil || (string(magic) != "PK\x03\x04" && string(magic) != "PK\x05\x06") {
		writeError(w, r, validation("a code package must be a zip file"))
		return
	}
	if err := f.Sync(); err != nil {
		writeError(w, r, internal(fmt.Sprintf("writing upload: %v", err)))
		return
	}
	dst := filepath.Join(dir, hash+".zip")
	// Placed under the reference hold: garbage collection never removes
	// an artifact in the instant it is uploaded again.
	release := s.holdReferences()
	err = os.Rename(f.Name(), dst)
	release()
	unhold() // stored, it counts as a file
	if err != nil {
		writeError(w, r, internal(fmt.Sprintf("storing upload: %v", err)))
		return
	}
	abs, _ := filepath.Abs(dst)
	writeUploaded(w, (&url.URL{Scheme: "file", Path: abs}).String(), hash, n)
}

func writeUploaded(w http.ResponseWriter, uri, hash string, n int64) {
	b, _ := json.Marshal(map[string]any{"uri": uri, "sha256": hash, "sizeInBytes": n})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	w.Write(b)
}

// storeUpload is storeArtifact's way into the store, for a cluster's
// control: the upload reaches every replica and node, named
// kiln-upload://ACCOUNT/SHA256.zip.
// The store checks the quota again as it records the upload, counting
// the uploads recorded meanwhile (also other control replicas'); unhold
// releases this one's hold once it is recorded.
func (s *Server) storeUpload(w http.ResponseWriter, r *http.Request, key store.AccessKey, hash string, unhold func()) {
	// The store writes as it reads, so the one check that needs the
	// content comes first: a package starts with a zip's magic.
	br := bufio.NewReaderSize(r.Body, 4096)
	if magic, _ := br.Peek(4); string(magic) != "PK\x03\x04" && string(magic) != "PK\x05\x06" {
		writeError(w, r, validation("a code package must be a zip file"))
		return
	}
	// Only what is recorded: a hold of another upload of this replica
	// may be recorded by now, and would count twice.
	adm := store.Admission{Defaults: s.cfg.Quota}
	up, err := s.cfg.Uploads.PutUpload(r.Context(), key.Account, hash, r.ContentLength, br, &adm)
	unhold()
	var qe *store.QuotaError
	if errors.As(err, &qe) {
		writeError(w, r, quotaError(err))
		return
	}
	if errors.Is(err, errdefs.ErrInvalid) {
		writeError(w, r, validation("the body does not match its Content-Length and X-Amz-Content-Sha256"))
		return
	}
	if err != nil {
		writeError(w, r, internal(fmt.Sprintf("storing upload: %v", err)))
		return
	}
	writeUploaded(w, up.URI(), up.SHA256, up.SizeBytes)
}

// claimUpload renews the grace of the upload an image version is about to
// name (store uploads only), so that garbage collection on any replica
// keeps it; an upload that is gone is the caller's to upload again.
func (s *Server) claimUpload(ctx context.Context, account string, a *store.CodeArtifact) error {
	if a == nil || s.cfg.Uploads == nil || !strings.HasPrefix(a.URI, store.UploadScheme+":") {
		return nil
	}
	owner, sha, err := store.ParseUploadURI(a.URI)
	if err != nil || owner != account {
		return fieldError("codeArtifact.uri", a.URI, "Member must be one of the account's uploads")
	}
	err = s.cfg.Uploads.TouchUpload(ctx, account, sha, s.cfg.Now())
	if errors.Is(err, errdefs.ErrNotFound) {
		return fieldError("codeArtifact.uri", a.URI, "the upload is gone (unused uploads are removed after a while): upload the package again")
	}
	return err
}

// checkCodeURI says whether account may build from uri. Remote packages
// (s3, https, http) are fetched by the builder; local ones (file:// or a
// path) only from the account's own uploads, so that a tenant cannot make
// the builder read the host's files; operator accounts may name any path.
func (s *Server) checkCodeURI(account, uri string) error {
	u, err := url.Parse(uri)
	if err != nil {
		return fieldError("codeArtifact.uri", uri, "Member must be a URI (s3://, https://, or an uploaded file:// package)")
	}
	switch u.Scheme {
	case "s3", "https", "http":
		if u.Host == "" {
			return fieldError("codeArtifact.uri", uri, "Member must name a bucket or host")
		}
		return nil
	case store.UploadScheme:
		owner, _, err := store.ParseUploadURI(uri)
		if err != nil || s.cfg.Uploads == nil {
			return fieldError("codeArtifact.uri", uri, "Member must be the uri an upload to this server answered ("+store.UploadScheme+"://ACCOUNT/SHA256.zip)")
		}
		// Not even an operator builds from another account's upload: the
		// node's builder reads only the building account's.
		if owner != account {
			return fieldError("codeArtifact.uri", uri, "Member must be one of the account's own uploads")
		}
		return nil
	case "file", "":
	default:
		return fieldError("codeArtifact.uri", uri, "Member must use s3://, https:// or http://, or be a package uploaded with kiln")
	}
	if s.cfg.ArtifactDir != "" {
		own, err := filepath.Abs(filepath.Join(s.cfg.ArtifactDir, account))
		p := filepath.Clean(u.Path)
		if err == nil && u.Host == "" && filepath.IsAbs(p) && strings.HasPrefix(p, own+string(filepath.Separator)) {
			return nil
		}
	}
	if slices.Contains(s.cfg.OperatorAccounts, account) {
		// The one privilege the operator has over tenants: it leaves a trace.
		slog.Info("operator builds from a host path", "account", account, "path", uri)
		return nil
	}
	slog.Warn("refused a build from a host path: the account is not the operator", "account", account, "path", uri)
	return fieldError("codeArtifact.uri", uri, "local packages must be uploaded first (kiln create-microvm-image --code, or PUT "+ArtifactPath+")")
}
