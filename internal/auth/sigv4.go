// Package auth authenticates API requests with AWS Signature Version 4 and
// manages the access keys they are signed with. Verification does not
// re-implement the algorithm: it rebuilds the request from the headers the
// client says it signed, signs that with aws-sdk-go-v2's signer and the
// stored secret, and compares the two signatures in constant time.
package auth

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// ErrDenied is returned for every authentication failure; the API maps it to
// AccessDeniedException. The wrapped message says which check failed.
var ErrDenied = errors.New("access denied")

// MaxSkew is how far a request's X-Amz-Date may be from the server clock.
const MaxSkew = 5 * time.Minute

// KeyStore is the part of store.Store the verifier reads.
type KeyStore interface {
	GetAccessKey(ctx context.Context, id string) (store.AccessKey, error)
}

// Verifier checks SigV4 signatures. It caches keys for a few seconds so a
// busy client does not cost a database read per request; a deleted key
// therefore stops working within CacheTTL.
type Verifier struct {
	keys     KeyStore
	service  string
	signer   *v4.Signer
	Now      func() time.Time
	CacheTTL time.Duration

	mu    sync.RWMutex
	cache map[string]cachedKey
}

type cachedKey struct {
	key     store.AccessKey
	expires time.Time
}

// NewVerifier returns a verifier for requests signed for service (kiln's
// API uses "lambda", as AWS does).
func NewVerifier(keys KeyStore, service string) *Verifier {
	return &Verifier{
		keys:    keys,
		service: service,
		signer: v4.NewSigner(func(o *v4.SignerOptions) {
			o.DisableURIPathEscaping = false
		}),
		Now:      time.Now,
		CacheTTL: 5 * time.Second,
		cache:    map[string]cachedKey{},
	}
}

// credential is the parsed Authorization header.
type credential struct {
	keyID, date, region, service string
	signedHeaders                []string
	signature                    string
}

func parseAuthorization(h string) (credential, error) {
	var c credential
	const algo = "AWS4-HMAC-SHA256 "
	if !strings.HasPrefix(h, algo) {
		return c, fmt.Errorf("authorization header missing or not AWS4-HMAC-SHA256: %w", ErrDenied)
	}
	for _, part := range strings.Split(h[len(algo):], ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "Credential":
			f := strings.Split(v, "/")
			if len(f) != 5 || f[4] != "aws4_request" {
				return c, fmt.Errorf("malformed credential scope: %w", ErrDenied)
			}
			c.keyID, c.date, c.region, c.service = f[0], f[1], f[2], f[3]
		case "SignedHeaders":
			c.signedHeaders = strings.Split(v, ";")
		case "Signature":
			c.signature = v
		}
	}
	if c.keyID == "" || len(c.signedHeaders) == 0 || c.signature == "" {
		return c, fmt.Errorf("incomplete authorization header: %w", ErrDenied)
	}
	return c, nil
}

func (v *Verifier) key(ctx context.Context, id string) (store.AccessKey, error) {
	now := v.Now()
	v.mu.RLock()
	c, ok := v.cache[id]
	v.mu.RUnlock()
	if ok && now.Before(c.expires) {
		return c.key, nil
	}
	k, err := v.keys.GetAccessKey(ctx, id)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return k, fmt.Errorf("unknown access key %s: %w", id, ErrDenied)
		}
		return k, fmt.Errorf("looking up access key: %w", err)
	}
	v.mu.Lock()
	if len(v.cache) > 10000 {
		v.cache = map[string]cachedKey{}
	}
	v.cache[id] = cachedKey{key: k, expires: now.Add(v.CacheTTL)}
	v.mu.Unlock()
	return k, nil
}

// Forget drops a key from the cache (after deleting it in this process).
func (v *Verifier) Forget(id string) {
	v.mu.Lock()
	delete(v.cache, id)
	v.mu.Unlock()
}

// Verify authenticates r, whose body has already been read into body, and
// returns the key that signed it. Failures wrap ErrDenied, except a store
// that cannot be read.
func (v *Verifier) Verify(r *http.Request, body []byte) (store.AccessKey, error) {
	sum := sha256.Sum256(body)
	return v.VerifyHash(r, hex.EncodeToString(sum[:]), int64(len(body)))
}

// VerifyHash authenticates r whose body has not been read: payloadHash is
// the hex SHA-256 the client declared (X-Amz-Content-Sha256) and length
// the body's length. The caller must then check that the body it reads
// has that hash (streamed uploads: authenticate before writing anything).
func (v *Verifier) VerifyHash(r *http.Request, payloadHash string, length int64) (store.AccessKey, error) {
	c, err := parseAuthorization(r.Header.Get("Authorization"))
	if err != nil {
		return store.AccessKey{}, err
	}
	if c.service != v.service {
		return store.AccessKey{}, fmt.Errorf("credential scope names service %q, not %q: %w", c.service, v.service, ErrDenied)
	}
	amzDate := r.Header.Get("X-Amz-Date")
	t, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return store.AccessKey{}, fmt.Errorf("missing or malformed X-Amz-Date: %w", ErrDenied)
	}
	if skew := v.Now().Sub(t); skew > MaxSkew || skew < -MaxSkew {
		return store.AccessKey{}, fmt.Errorf("signature expired: request time %s is more than %s from server time: %w", amzDate, MaxSkew, ErrDenied)
	}
	if c.date != t.Format("20060102") {
		return store.AccessKey{}, fmt.Errorf("credential scope date does not match X-Amz-Date: %w", ErrDenied)
	}
	k, err := v.key(r.Context(), c.keyID)
	if err != nil {
		return k, err
	}

	// Rebuild the request with exactly the headers the client signed.
	u := *r.URL
	u.Scheme, u.Host = "http", r.Host
	clone := &http.Request{Method: r.Method, URL: &u, Host: r.Host, Header: http.Header{}}
	for _, name := range c.signedHeaders {
		switch name {
		case "host":
		case "content-length":
			clone.ContentLength = length
		default:
			if vals := r.Header.Values(name); len(vals) > 0 {
				clone.Header[http.CanonicalHeaderKey(name)] = vals
			}
		}
	}
	if err := v.signer.SignHTTP(r.Context(), aws.Credentials{AccessKeyID: k.ID, SecretAccessKey: k.Secret}, clone,
		payloadHash, c.service, c.region, t); err != nil {
		return k, fmt.Errorf("computing signature: %w", err)
	}
	want, err := parseAuthorization(clone.Header.Get("Authorization"))
	if err != nil {
		return k, fmt.Errorf("reading computed signature: %w", err)
	}
	if !hmac.Equal([]byte(want.signature), []byte(c.signature)) {
		return store.AccessKey{}, fmt.Errorf("the request signature does not match the signature computed with the stored secret: %w", ErrDenied)
	}
	return k, nil
}

// SignRequest signs req (whose body is body) for service and region with
// the given key, for kiln's own clients (the CLI and the benchmark).
func SignRequest(ctx context.Context, signer *v4.Signer, req *http.Request, body []byte, keyID, secret, service, region string, now time.Time) error {
	sum := sha256.Sum256(body)
	return SignRequestHash(ctx, signer, req, hex.EncodeToString(sum[:]), keyID, secret, service, region, now)
}

// SignRequestHash signs req whose body has the hex SHA-256 payloadHash.
func SignRequestHash(ctx context.Context, signer *v4.Signer, req *http.Request, payloadHash, keyID, secret, service, region string, now time.Time) error {
	if err := signer.SignHTTP(ctx, aws.Credentials{AccessKeyID: keyID, SecretAccessKey: secret}, req,
		payloadHash, service, region, now); err != nil {
		return fmt.Errorf("signing request: %w", err)
	}
	return nil
}
