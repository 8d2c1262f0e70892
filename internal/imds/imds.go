// Package imds serves the instance metadata protocol (IMDSv2) that AWS
// serves inside a Lambda MicroVM, so that the AWS SDKs' default credential
// chain finds the VM's execution role credentials. One Handler per VM,
// listening inside that VM's network namespace at 169.254.169.254:80
// (internal/netns makes the address local there): a VM can only ever reach
// its own Handler, so it only ever sees its own role's credentials.
//
// The protocol, as AWS documents it for EC2 ("Use the Instance Metadata
// Service to access instance metadata", IMDSv2) and as the SDKs use it:
//
//	PUT /latest/api/token            X-aws-ec2-metadata-token-ttl-seconds: 1..21600
//	  -> a session token (text), echoed TTL header
//	GET /latest/meta-data/iam/security-credentials/       -> role name, or 404
//	GET /latest/meta-data/iam/security-credentials/ROLE   -> credentials JSON
//	    each GET with X-aws-ec2-metadata-token: TOKEN
//
// Only v2 is offered (AWS's "HttpTokens: required"): a GET without a valid
// token is 401, and a PUT that carries X-Forwarded-For (a proxied request,
// which v2 exists to stop) is 403.
package imds

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
)

const (
	// TokenPath, TTLHeader and TokenHeader are IMDSv2's names.
	TokenPath   = "/latest/api/token"
	TTLHeader   = "X-aws-ec2-metadata-token-ttl-seconds"
	TokenHeader = "X-aws-ec2-metadata-token"
	// CredentialsPath lists the role; CredentialsPath+ROLE gives its keys.
	CredentialsPath = "/latest/meta-data/iam/security-credentials/"
	// MaxTTL is IMDSv2's longest session (6 hours).
	MaxTTL = 21600
	// staticLifetime is the Expiration reported for credentials that do
	// not expire (a static profile): clients refresh before it, so a
	// rotated profile reaches running VMs within the hour.
	staticLifetime = time.Hour
)

// Handler answers one VM's metadata requests. The zero value is unusable:
// use New.
type Handler struct {
	role  string                  // role name ("" = the VM has no role)
	creds aws.CredentialsProvider // nil when role is ""
	key   []byte                  // signs session tokens
	now   func() time.Time
	log   *slog.Logger
}

// Config of one VM's Handler.
type Config struct {
	// RoleARN is the VM's executionRoleArn ("" = none: the credential
	// paths answer 404, as on an instance without a profile).
	RoleARN string
	// Credentials are RoleARN's; required with RoleARN.
	Credentials aws.CredentialsProvider
	// Now is the clock (default time.Now).
	Now func() time.Time
	Log *slog.Logger
}

// New returns the Handler of one VM.
func New(cfg Config) (*Handler, error) {
	h := &Handler{now: cfg.Now, log: cfg.Log, creds: cfg.Credentials}
	if h.now == nil {
		h.now = time.Now
	}
	if h.log == nil {
		h.log = slog.Default()
	}
	if cfg.RoleARN != "" {
		name, err := RoleName(cfg.RoleARN)
		if err != nil {
			return nil, err
		}
		if cfg.Credentials == nil {
			return nil, fmt.Errorf("imds: role %s has no credentials source", cfg.RoleARN)
		}
		h.role = name
	}
	h.key = make([]byte, 32)
	if _, err := rand.Read(h.key); err != nil {
		return nil, fmt.Errorf("imds: token key: %w", err)
	}
	return h, nil
}

// RoleName is the last path element of an IAM role ARN
// (arn:aws:iam::123456789012:role/path/NAME → NAME), what IMDS lists.
func RoleName(arn string) (string, error) {
	_, res, ok := strings.Cut(arn, ":role/")
	if !ok || !strings.HasPrefix(arn, "arn:") || res == "" || strings.HasSuffix(res, "/") {
		return "", fmt.Errorf("imds: %q is not an IAM role ARN", arn)
	}
	return res[strings.LastIndexByte(res, '/')+1:], nil
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Server", "EC2ws")
	if r.URL.Path == TokenPath {
		h.token(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	if !h.validToken(r.Header.Get(TokenHeader)) {
		// What AWS answers when v2 is required and the token is missing,
		// expired or not ours.
		http.Error(w, "Unauthorized", http.StatusUnauthorized)
		return
	}
	switch p := r.URL.Path; {
	case p == CredentialsPath:
		if h.role == "" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, h.role)
	case strings.HasPrefix(p, CredentialsPath):
		if h.role == "" || strings.TrimPrefix(p, CredentialsPath) != h.role {
			http.NotFound(w, r)
			return
		}
		h.credentials(w, r)
	case p == "/latest/meta-data/" || p == "/latest/meta-data":
		w.Header().Set("Content-Type", "text/plain")
		if h.role != "" {
			fmt.Fprint(w, "iam/\n")
		}
	case p == "/latest/meta-data/iam/" || p == "/latest/meta-data/iam":
		if h.role == "" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, "security-credentials/\n")
	default:
		http.NotFound(w, r)
	}
}

func (h *Handler) token(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPut {
		w.Header().Set("Allow", "PUT")
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get("X-Forwarded-For") != "" {
		http.Error(w, "Forbidden", http.StatusForbidden)
		return
	}
	ttl, err := ParseTTL(r.Header.Get(TTLHeader))
	if err != nil {
		http.Error(w, "Bad Request", http.StatusBadRequest)
		return
	}
	w.Header().Set(TTLHeader, strconv.Itoa(ttl))
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprint(w, h.sign(h.now().Add(time.Duration(ttl)*time.Second)))
}

// ParseTTL reads the token TTL header: whole seconds, 1..MaxTTL.
func ParseTTL(v string) (int, error) {
	if v == "" || len(v) > 5 {
		return 0, errors.New("ttl: want 1..21600 seconds")
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > MaxTTL || strconv.Itoa(n) != v {
		return 0, errors.New("ttl: want 1..21600 seconds")
	}
	return n, nil
}

// A token is base64url(expiry unix seconds, 8 bytes big-endian || HMAC of
// them): nothing to store, valid for this Handler (this VM) only.
func (h *Handler) sign(exp time.Time) string {
	var b [8 + sha256.Size]byte
	binary.BigEndian.PutUint64(b[:8], uint64(exp.Unix()))
	m := hmac.New(sha256.New, h.key)
	m.Write(b[:8])
	copy(b[8:], m.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (h *Handler) validToken(tok string) bool {
	exp, ok := h.parseToken(tok)
	return ok && h.now().Before(exp)
}

// parseToken checks a token's MAC and returns its expiry.
func (h *Handler) parseToken(tok string) (time.Time, bool) {
	if len(tok) != base64.RawURLEncoding.EncodedLen(8+sha256.Size) {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(tok)
	if err != nil || len(b) != 8+sha256.Size {
		return time.Time{}, false
	}
	m := hmac.New(sha256.New, h.key)
	m.Write(b[:8])
	if !hmac.Equal(m.Sum(nil), b[8:]) {
		return time.Time{}, false
	}
	sec := binary.BigEndian.Uint64(b[:8])
	if sec > 1<<62 {
		return time.Time{}, false
	}
	return time.Unix(int64(sec), 0), true
}

// credentialsDoc is the JSON IMDS serves for a role (the SDKs read
// AccessKeyId, SecretAccessKey, Token and Expiration).
type credentialsDoc struct {
	Code            string
	LastUpdated     string
	Type            string
	AccessKeyId     string
	SecretAccessKey string
	Token           string
	Expiration      string
}

func (h *Handler) credentials(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	c, err := h.creds.Retrieve(ctx)
	if err != nil {
		// The operator's source failed (STS down, profile gone): the
		// guest's SDK retries; the reason is for the operator's log.
		h.log.Warn("imds: retrieving role credentials", "role", h.role, "err", err)
		http.Error(w, "Internal Server Error", http.StatusInternalServerError)
		return
	}
	now := h.now().UTC()
	exp := now.Add(staticLifetime)
	if c.CanExpire {
		exp = c.Expires.UTC()
	}
	w.Header().Set("Content-Type", "text/plain")
	json.NewEncoder(w).Encode(credentialsDoc{Code: "Success", LastUpdated: now.Format(time.RFC3339), Type: "AWS-HMAC",
		AccessKeyId: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey, Token: c.SessionToken, Expiration: exp.Format(time.RFC3339)})
}
