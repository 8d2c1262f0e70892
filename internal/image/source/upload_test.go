package source

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// TestFetchUpload reads a package out of a real store: for its own account
// only, and never from bytes that do not hash to the name.
func TestFetchUpload(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	z := zipBytes(t, pkg)
	up, err := st.PutUpload(ctx, "111111111111", "", int64(len(z)), bytes.NewReader(z), nil)
	if err != nil {
		t.Fatal(err)
	}
	fetch := func(cfg Config) (string, error) {
		dst := filepath.Join(t.TempDir(), "context")
		os.Mkdir(dst, 0o755)
		return dst, Fetch(ctx, up.URI(), dst, cfg)
	}
	dst, err := fetch(Config{Uploads: st, Account: "111111111111"})
	if err != nil {
		t.Fatal(err)
	}
	checkPkg(t, dst)

	for name, cfg := range map[string]Config{
		"another account": {Uploads: st, Account: "222222222222", AllowLocal: true},
		"no store":        {Account: "111111111111"},
	} {
		if _, err := fetch(cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Fetch = %v, want ErrInvalid", name, err)
		}
	}
	gone := store.UploadURI("111111111111", strings.Repeat("0", 64))
	if err := Fetch(ctx, gone, t.TempDir(), Config{Uploads: st, Account: "111111111111"}); err == nil || !strings.Contains(err.Error(), "upload the package again") {
		t.Errorf("Fetch of a missing upload = %v", err)
	}
	if _, err := fetch(Config{Uploads: damaged{st}, Account: "111111111111"}); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("Fetch of damaged bytes = %v", err)
	}
}

// damaged is a stand-in for a store whose bytes changed under the name:
// it flips the last byte of what the real store reads.
type damaged struct{ st *sqlite.Store }

func (d damaged) OpenUpload(ctx context.Context, account, sum string) (io.ReadCloser, store.Upload, error) {
	rc, up, err := d.st.OpenUpload(ctx, account, sum)
	if err != nil {
		return nil, up, err
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return nil, up, err
	}
	b[len(b)-1] ^= 1
	if h := sha256.Sum256(b); hex.EncodeToString(h[:]) == sum {
		panic("flipping a byte kept the hash")
	}
	return io.NopCloser(bytes.NewReader(b)), up, nil
}
