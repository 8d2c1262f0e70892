package e2b

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/gc"
)

// TestTemplateFilesExpireUnlessUsed: on one host and in a cluster's store,
// template files that the SDK's files check found present or a build read
// are renewed, so garbage collection keeps them, while files unused for
// the max age go; a use renews only the account's own files of the hash
// (another account's files of the same hash expire). An upload past the
// account's bound says how space comes back.
func TestTemplateFilesExpireUnlessUsed(t *testing.T) {
	const day = 24 * time.Hour
	hashB := strings.Repeat("b", 64)
	for _, mode := range []string{"one host", "cluster"} {
		t.Run(mode, func(t *testing.T) {
			ctx := context.Background()
			e, dir := newTemplateEnv(t)
			filesDir := FilesDir(filepath.Join(dir, "e2b-templates"))
			if mode == "cluster" {
				e, dir = clusterReplica(t, e)
				filesDir = ""
			}
			refs := &gc.References{}
			e.srv.cfg.FilesMaxAge, e.srv.cfg.References = gc.DefaultTemplateFilesMaxAge, refs
			upload := func(key, hash string) {
				t.Helper()
				_, u := e.uploadLink(key, "my-tpl", hash)
				if st, body := put(t, u, tarGz(t, map[string]string{"hello.txt": "hi\n"})); st != 200 {
					t.Fatalf("upload: %d %s", st, body)
				}
			}
			upload(e.key, hashA)
			upload(e.key, hashB)
			upload(e.otherKey, hashA)
			// Everything was last used eight days ago.
			old := time.Now().Add(-8 * day)
			if filesDir != "" {
				filepath.WalkDir(filesDir, func(p string, d fs.DirEntry, err error) error {
					if err == nil && !d.IsDir() {
						os.Chtimes(p, old, old)
					}
					return err
				})
			} else {
				all, err := e.st.ListTemplateFiles(ctx, "")
				if err != nil || len(all) != 3 {
					t.Fatalf("the store's template files: %+v, %v", all, err)
				}
				for _, f := range all {
					if err := e.st.TouchTemplateFile(ctx, f.Account, f.Hash, old); err != nil {
						t.Fatal(err)
					}
				}
			}

			// The files check uses hashA; a build reads hashB.
			if present, _ := e.uploadLink(e.key, "my-tpl", hashA); !present {
				t.Fatal("files not present before GC")
			}
			ans := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "my-tpl"})
			e.want(ans, 202, "request build")
			var req struct {
				BuildID string `json:"buildID"`
			}
			ans.json(t, &req)
			e.want(e.do(e.key, "POST", "/v2/templates/my-tpl/builds/"+req.BuildID, map[string]any{"fromImage": "debian:12",
				"steps": []map[string]any{{"type": "COPY", "args": []string{"hello.txt", "/opt/"}, "filesHash": hashB}}}), 202, "build")

			rep, err := gc.New(gc.Config{Store: e.st, DataDir: dir, References: refs, TemplateFilesDir: filesDir}).Run(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if rep[gc.KindTemplateFiles] != 1 {
				t.Errorf("GC report %v, want 1 template file (the other account's)", rep)
			}
			for _, tt := range []struct {
				what, key, hash string
				want            bool
			}{{"checked", e.key, hashA, true}, {"built", e.key, hashB, true}, {"another account's, unused", e.otherKey, hashA, false}} {
				if present, _ := e.uploadLink(tt.key, "my-tpl", tt.hash); present != tt.want {
					t.Errorf("%s files after GC: present=%v, want %v", tt.what, present, tt.want)
				}
			}

			// At the bound, the refusal says what to do.
			e.srv.cfg.MaxAccountUploadBytes = 1
			_, u := e.uploadLink(e.key, "my-tpl", hashA)
			st, body := put(t, u, tarGz(t, map[string]string{"x": "x"}))
			if st != 429 || !strings.Contains(body, "used for 7 days are removed") || !strings.Contains(body, "--template-files-max-account-bytes") {
				t.Errorf("upload past the bound: %d %s", st, body)
			}
		})
	}
}
