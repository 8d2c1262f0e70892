package auth

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

type oneKey struct{ k store.AccessKey }

func (o oneKey) GetAccessKey(_ context.Context, id string) (store.AccessKey, error) {
	if id != o.k.ID {
		return store.AccessKey{}, errdefs.ErrNotFound
	}
	return o.k, nil
}

// FuzzVerifyHash: the API authenticates large bodies from the headers
// alone (Authorization, X-Amz-Date, X-Amz-Content-Sha256), all chosen by
// the client. Whatever they hold, verification must not panic and must
// not accept a request the key did not sign.
func FuzzVerifyHash(f *testing.F) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	key := store.AccessKey{ID: "AKIATEST", Secret: "secret", Account: "111111111111"}
	v := NewVerifier(oneKey{key}, "lambda")
	v.Now = func() time.Time { return now }
	date := now.Format("20060102T150405Z")
	scope := fmt.Sprintf("AKIATEST/%s/us-east-1/lambda/aws4_request", now.Format("20060102"))
	f.Add("AWS4-HMAC-SHA256 Credential="+scope+", SignedHeaders=host;x-amz-date;x-amz-content-sha256, Signature=00", date, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", int64(0))
	f.Add("AWS4-HMAC-SHA256 Credential="+scope+", SignedHeaders=content-length;host, Signature=ff", date, "UNSIGNED-PAYLOAD", int64(-1))
	f.Add("AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request,SignedHeaders=;;;,Signature=", "garbage", "", int64(1<<40))
	f.Add("", "", "", int64(0))
	f.Fuzz(func(t *testing.T, authz, amzDate, hash string, length int64) {
		r, err := http.NewRequest("PUT", "http://127.0.0.1:9090/kiln/v1/code-artifacts", http.NoBody)
		if err != nil {
			t.Skip()
		}
		r.Header.Set("Authorization", authz)
		r.Header.Set("X-Amz-Date", amzDate)
		r.Header.Set("X-Amz-Content-Sha256", hash)
		if _, err := v.VerifyHash(r, hash, length); err == nil {
			// Only a real signature by the key passes: re-sign and compare.
			c, perr := parseAuthorization(authz)
			if perr != nil {
				t.Fatalf("accepted an unparsable Authorization %q", authz)
			}
			clone := r.Clone(context.Background())
			clone.Header.Del("Authorization")
			if err := SignRequestHash(context.Background(), v.signer, clone, hash, key.ID, key.Secret, c.service, c.region, now); err != nil {
				t.Fatal(err)
			}
			if want, _ := parseAuthorization(clone.Header.Get("Authorization")); want.signature != c.signature {
				t.Fatalf("accepted a signature the key did not make: %q", authz)
			}
		}
	})
}
