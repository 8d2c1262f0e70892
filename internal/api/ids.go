package api

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// ARN kinds kiln issues: arn:aws:lambda:REGION:ACCOUNT:KIND:ID.
const (
	kindMicrovm = "microvm"
	kindImage   = "microvm-image"
	// managedAccount stands for the account of managed base images.
	managedAccount = "aws"
)

func (s *Server) arn(account, kind, id string) string {
	return fmt.Sprintf("arn:aws:lambda:%s:%s:%s:%s", s.cfg.Region, account, kind, id)
}

type parsedARN struct {
	region, account, kind, id string
}

// parseARN splits arn:PARTITION:lambda:REGION:ACCOUNT:KIND:ID.
func parseARN(s string) (parsedARN, bool) {
	f := strings.SplitN(s, ":", 7)
	if len(f) != 7 || f[0] != "arn" || f[2] != "lambda" || f[6] == "" {
		return parsedARN{}, false
	}
	return parsedARN{region: f[3], account: f[4], kind: f[5], id: f[6]}, true
}

// resolve turns an identifier (id, name or ARN) of kind into the id, for
// the caller's account. An ARN of another account, or of another kind,
// names nothing the caller can see: ResourceNotFoundException.
func resolve(c *call, kind, field, ident string) (string, error) {
	if ident == "" {
		return "", fieldError(field, nil, "Member must not be null")
	}
	if len(ident) > 256 {
		return "", fieldError(field, nil, "Member must have length less than or equal to 256")
	}
	if !strings.HasPrefix(ident, "arn:") {
		return ident, nil
	}
	a, ok := parseARN(ident)
	if !ok {
		return "", fieldError(field, ident, "Member must be a valid ARN or identifier")
	}
	if a.kind != kind || a.account != c.account {
		return "", notFound(kind, ident)
	}
	return a.id, nil
}

var (
	imageNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)
	roleARNRE   = regexp.MustCompile(`^arn:aws[a-zA-Z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$`)
	// Managed connectors live in the "aws" account and have a two-part
	// name (aws-network-connector:ALL_INGRESS); customer ones are in the
	// caller's account.
	connARNRE = regexp.MustCompile(`^arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]*:(\d{12}|aws):network-connector:[a-zA-Z0-9_.:/-]+$`)
)

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("reading random bytes: %v", err)) // the kernel RNG does not fail
	}
	return hex.EncodeToString(b)
}

// newMicrovmID returns an id usable as a DNS label of the endpoint host.
func newMicrovmID() string { return "mvm-" + randomHex(10) }

func newBuildID() string { return randomHex(16) }

// newRequestID returns a UUID-shaped random id.
func newRequestID() string {
	h := randomHex(16)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// HMACIssuer is the default TokenIssuer: a token is
// "v1.<base64url payload>.<base64url HMAC-SHA256>", the payload naming the
// account, microVM, expiry, kind and ports. The endpoint proxy verifies it
// with the same key.
type HMACIssuer struct{ key []byte }

// NewHMACIssuer returns an issuer signing with key (random if nil).
func NewHMACIssuer(key []byte) *HMACIssuer {
	if key == nil {
		key = []byte(randomHex(32))
	}
	return &HMACIssuer{key: key}
}

// TokenPayload is what an HMACIssuer token asserts.
type TokenPayload struct {
	Account string     `json:"a"`
	Microvm string     `json:"m"`
	Expires int64      `json:"e"`
	Shell   bool       `json:"s,omitempty"`
	Ports   []PortSpec `json:"p,omitempty"`
	Nonce   string     `json:"n"`
}

// IssueToken implements TokenIssuer.
func (h *HMACIssuer) IssueToken(_ context.Context, m store.Microvm, req TokenRequest) (map[string]string, error) {
	p, err := json.Marshal(TokenPayload{Account: m.Account, Microvm: m.ID, Expires: req.Expires.Unix(), Shell: req.Shell, Ports: req.Ports, Nonce: randomHex(8)})
	if err != nil {
		return nil, fmt.Errorf("encoding token: %w", err)
	}
	enc := base64.RawURLEncoding.EncodeToString(p)
	mac := hmac.New(sha256.New, h.key)
	mac.Write([]byte("v1." + enc))
	tok := "v1." + enc + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
	return map[string]string{"X-aws-proxy-auth": tok}, nil
}

// Verify checks a token made by IssueToken and returns its payload; it does
// not check expiry.
func (h *HMACIssuer) Verify(tok string) (TokenPayload, bool) {
	var p TokenPayload
	i := strings.LastIndexByte(tok, '.')
	if i < 0 || !strings.HasPrefix(tok, "v1.") {
		return p, false
	}
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil {
		return p, false
	}
	mac := hmac.New(sha256.New, h.key)
	mac.Write([]byte(tok[:i]))
	if !hmac.Equal(sig, mac.Sum(nil)) {
		return p, false
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok[3:i])
	if err != nil || json.Unmarshal(raw, &p) != nil {
		return p, false
	}
	return p, true
}
