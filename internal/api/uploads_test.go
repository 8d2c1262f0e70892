package api_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestStoreUploads is a cluster's control: uploads go into the store, not
// a folder, so that a second replica over the same store (here: a second
// API server) builds from what the first received; every account sees
// only its own, and refused bodies leave nothing behind.
func TestStoreUploads(t *testing.T) {
	e := newEnv(t)
	replica := func() func(store.AccessKey) *awscli.Client {
		srv := api.NewServer(api.Config{Uploads: e.st, OperatorAccounts: []string{"999999999999"}}, e.st, e.be)
		hs := httptest.NewServer(srv.Handler())
		t.Cleanup(hs.Close)
		return func(k store.AccessKey) *awscli.Client {
			return awscli.NewClient(hs.URL, "us-east-1", auth.Credentials{AccessKeyID: k.ID, SecretAccessKey: k.Secret})
		}
	}
	first, second := replica(), replica()
	var zipBuf strings.Builder
	if err := awscli.ZipDir(t.TempDir(), &zipWriter{&zipBuf}); err != nil {
		t.Fatal(err)
	}
	zipBytes := zipBuf.String()
	sum := sha256.Sum256([]byte(zipBytes))
	hash := hex.EncodeToString(sum[:])
	ctx := context.Background()
	uri, err := first(e.key).Upload(ctx, strings.NewReader(zipBytes), int64(len(zipBytes)), hash)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	if want := "kiln-upload://111111111111/" + hash + ".zip"; uri != want {
		t.Fatalf("uploaded uri %s, want %s", uri, want)
	}
	withCode := func(name, uri string) map[string]any {
		b := imageBody(name)
		b["codeArtifact"] = map[string]any{"uri": uri}
		return b
	}
	if _, err := do(t, second(e.key), "POST", base+"/microvm-images", nil, withCode("uploaded", uri)); err != nil {
		t.Fatalf("the other replica refused the upload: %v", err)
	}

	operator := e.newKey("999999999999")
	for name, tt := range map[string]struct {
		k   store.AccessKey
		uri string
	}{
		"upload of another account":              {e.newKey("222222222222"), uri},
		"operator naming another account upload": {operator, uri},
		"not quite an upload uri":                {e.key, strings.TrimSuffix(uri, ".zip")},
		"a host path with no upload folder":      {e.key, "file:///etc/passwd"},
	} {
		_, err := do(t, second(tt.k), "POST", base+"/microvm-images", nil, withCode("x-"+strings.ReplaceAll(name, " ", "-"), tt.uri))
		fails(t, err, "ValidationException", "codeArtifact.uri")
	}

	for name, body := range map[string]struct{ body, hash, want string }{
		"hash mismatch": {zipBytes, strings.Repeat("0", 64), "does not match"},
		"not a zip":     {"hello", "", "zip"},
	} {
		h := body.hash
		if h == "" {
			s := sha256.Sum256([]byte(body.body))
			h = hex.EncodeToString(s[:])
		}
		_, err := first(e.key).Upload(ctx, strings.NewReader(body.body), int64(len(body.body)), h)
		if err == nil || !strings.Contains(err.Error(), body.want) {
			t.Errorf("%s: upload = %v, want %q", name, err, body.want)
		}
	}
	if ups, _ := e.st.ListUploads(ctx, ""); len(ups) != 1 || ups[0].SizeBytes != int64(len(zipBytes)) {
		t.Errorf("uploads after refusals: %+v", ups)
	}
	if n, _ := e.st.PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("refused uploads left %d chunks", n)
	}
	// The store counts its uploads toward StorageBytes; the API adds no
	// second count of them.
	q, err := do(t, first(e.key), "GET", "/kiln/v1/quota", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	use := q["usage"].(map[string]any)
	if got := use["storageBytes"].(float64) - use["snapshotBytes"].(float64); got != float64(len(zipBytes)) {
		t.Errorf("the upload counts %v bytes toward storage, want %d (usage %v)", got, len(zipBytes), use)
	}

	// Naming an upload renews its grace; one that is gone is refused.
	if _, err := e.st.DeleteUpload(ctx, "111111111111", hash, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	_, err = do(t, first(e.key), "POST", base+"/microvm-images", nil, withCode("gone", uri))
	fails(t, err, "ValidationException", "upload the package again")
}
