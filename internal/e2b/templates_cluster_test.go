package e2b

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	lc "github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// clusterReplica is one control replica of a cluster over e's store: its
// own data dir, the store's uploads and template files, the shared key.
func clusterReplica(t *testing.T, e *env) (*env, string) {
	dir := t.TempDir()
	be := fakebackend.New(lc.NewReporter(e.st), 0)
	t.Cleanup(be.Wait)
	r := *e
	r.api = api.NewServer(api.Config{Uploads: e.st}, e.st, be)
	r.srv = New(Config{API: r.api, Uploads: e.st, TemplateFiles: e.st, Store: e.st, Sandboxes: e.st, Tokens: e.tokens,
		Domain: "microvm.localhost:8443", TemplatesDir: filepath.Join(dir, "e2b-templates"), MaxUploadBytes: 1 << 20,
		MaxAccountUploadBytes: 1 << 10, WaitTimeout: 10 * time.Second})
	hs := httptest.NewServer(r.srv.Handler())
	t.Cleanup(hs.Close)
	r.url = hs.URL
	return &r, dir
}

// TestTemplateFilesAcrossReplicas: in a cluster the SDK's upload of a
// COPY step's files reaches one control replica and the build another;
// the files are in the store, so the second finds them, packs them into
// the build's package, and never shows them to another account.
func TestTemplateFilesAcrossReplicas(t *testing.T) {
	e := newEnv(t)
	a, dirA := clusterReplica(t, e)
	b, _ := clusterReplica(t, e)

	if present, _ := b.uploadLink(b.key, "my-tpl", hashA); present {
		t.Fatal("files present before any upload")
	}
	_, u := a.uploadLink(a.key, "my-tpl", hashA)
	first := tarGz(t, map[string]string{"hello.txt": "hi\n"})
	if st, body := put(t, u, first); st != 200 {
		t.Fatalf("upload through replica A: %d %s", st, body)
	}
	if _, err := os.Stat(filepath.Join(dirA, "e2b-templates", "files")); err == nil {
		t.Error("replica A kept the files in its data dir")
	}
	if present, _ := b.uploadLink(b.key, "my-tpl", hashA); !present {
		t.Fatal("replica B does not see the files uploaded through replica A")
	}
	if present, _ := b.uploadLink(b.otherKey, "my-tpl", hashA); present {
		t.Fatal("another account sees the account's files")
	}
	// The account's bound counts the store's files, whichever replica
	// took them: this one fits alone, not with the first.
	_, u2 := b.uploadLink(b.key, "my-tpl", strings.Repeat("b", 64))
	second := tarGz(t, map[string]string{"x": "x"})
	second = append(second, make([]byte, 1<<10-len(first)-len(second)+1)...)
	if st, body := put(t, u2, second); st != 429 {
		t.Errorf("an upload over the account's bound: %d %s", st, body)
	}
	if st, _ := put(t, u2, []byte("not an archive")); st != 400 {
		t.Errorf("a non-archive: %d", st)
	}

	start := map[string]any{"fromImage": "debian:12", "steps": []map[string]any{
		{"type": "COPY", "args": []string{"hello.txt", "/opt/"}, "filesHash": hashA}}}
	trigger := func(r *env, key string) answer {
		t.Helper()
		ans := r.do(key, "POST", "/v3/templates", map[string]any{"name": "my-tpl"})
		r.want(ans, 202, "request build")
		var req struct {
			BuildID string `json:"buildID"`
		}
		ans.json(t, &req)
		return r.do(key, "POST", "/v2/templates/my-tpl/builds/"+req.BuildID, start)
	}
	// Another account naming the hash has nothing uploaded under it.
	if ans := trigger(b, b.otherKey); ans.status != 400 || !strings.Contains(string(ans.body), "were not uploaded") {
		t.Fatalf("another account's build of the hash: %d %s", ans.status, ans.body)
	}
	b.want(trigger(b, b.key), 202, "build through replica B")

	var v struct {
		CodeArtifact store.CodeArtifact `json:"codeArtifact"`
	}
	if err := b.srv.op(context.Background(), store.AccessKey{ID: "t", Account: b.account}, "GET", "/microvm-images/my-tpl/versions/1", nil, nil, &v); err != nil {
		t.Fatal(err)
	}
	owner, sha, err := store.ParseUploadURI(v.CodeArtifact.URI)
	if err != nil || owner != b.account {
		t.Fatalf("the build's package is %s (%v), want one of the account's uploads in the store", v.CodeArtifact.URI, err)
	}
	rc, up, err := e.st.OpenUpload(context.Background(), owner, sha)
	if err != nil {
		t.Fatal(err)
	}
	pkg, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	zr, err := zip.NewReader(bytes.NewReader(pkg), up.SizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	f, err := zr.Open(filesDirInZip + "/" + hashA + "/hello.txt")
	if err != nil {
		t.Fatalf("the package lacks the files uploaded through replica A: %v", err)
	}
	got, _ := io.ReadAll(f)
	f.Close()
	if string(got) != "hi\n" {
		t.Errorf("hello.txt = %q", got)
	}
}
