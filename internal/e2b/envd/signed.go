package envd

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// CheckSignature checks a signed /files URL, as the SDK's uploadUrl and
// downloadUrl make them for a client without the envd access token:
// signature = "v1_" + base64(sha256("PATH:OPERATION:USER:TOKEN[:EXPIRATION]"))
// without padding, where PATH and USER are the URL's path and username
// parameters, OPERATION is "read" (GET) or "write" (POST), TOKEN is the
// sandbox's envd access token and EXPIRATION, when the URL carries
// signature_expiration, those Unix seconds, past which the URL is refused.
// The comparison takes constant time.
func CheckSignature(r *http.Request, accessToken string, now time.Time) error {
	q := r.URL.Query()
	var op string
	switch {
	case r.URL.Path != "/files":
		return fmt.Errorf("a signature opens only /files, not %s", r.URL.Path)
	case r.Method == http.MethodGet:
		op = "read"
	case r.Method == http.MethodPost:
		op = "write"
	default:
		return fmt.Errorf("a signed URL is for GET or POST, not %s", r.Method)
	}
	// The user is the signed username parameter and nothing else.
	if r.Header.Get("Authorization") != "" {
		return fmt.Errorf("a signed URL names its user in ?username=: send no Authorization header with it")
	}
	sig := q.Get("signature")
	if len(sig) > 128 || len(q["signature"]) != 1 || len(q["path"]) > 1 || len(q["username"]) > 1 || len(q["signature_expiration"]) > 1 {
		return fmt.Errorf("malformed signed URL: one signature, path, username and signature_expiration at most")
	}
	exp, hasExp := q.Get("signature_expiration"), q.Has("signature_expiration")
	if hasExp && exp == "" {
		return fmt.Errorf("signature_expiration is empty")
	}
	want := signFor(q.Get("path"), op, q.Get("username"), accessToken, exp)
	if subtle.ConstantTimeCompare([]byte(sig), []byte(want)) != 1 {
		return fmt.Errorf("invalid signature for this sandbox, path, operation and user: sign the URL again (uploadUrl, downloadUrl)")
	}
	if hasExp {
		n, err := strconv.ParseInt(exp, 10, 64)
		if err != nil {
			return fmt.Errorf("signature_expiration %q is not Unix seconds", exp)
		}
		if now.Unix() > n {
			return fmt.Errorf("the signed URL expired at %s: sign a new one", time.Unix(n, 0).UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// signFor is the SDK's getSignature (for tests and tools that make signed
// URLs): exp "" for a URL that does not expire.
func signFor(path, op, user, token, exp string) string {
	raw := path + ":" + op + ":" + user + ":" + token
	if exp != "" {
		raw += ":" + exp
	}
	sum := sha256.Sum256([]byte(raw))
	return "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
}
