package gc

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestCollectorExpiresTemplateFilesOnHost: one host's E2B template files
// go once unused (their mtime) for TemplateFilesMaxAge, whichever
// account's; recent ones, files that are not template files and uploads
// still being written stay.
func TestCollectorExpiresTemplateFilesOnHost(t *testing.T) {
	f := newFixture(t)
	root := filepath.Join(f.dataDir, "e2b-templates", "files")
	file := func(account, name string, age time.Duration) string {
		p := filepath.Join(root, account, name)
		os.MkdirAll(filepath.Dir(p), 0o700)
		if err := os.WriteFile(p, []byte("tar"), 0o600); err != nil {
			t.Fatal(err)
		}
		at := f.now.Add(-age)
		os.Chtimes(p, at, at)
		return p
	}
	const day = 24 * time.Hour
	gone := []string{
		file("111111111111", "aaaa.tar", 8*day),
		file("222222222222", "aaaa.tar", 30*day),
		file("111111111111", ".upload-1", 2*day), // a put that died
	}
	kept := []string{
		file("111111111111", "bbbb.tar", 6*day),
		file("222222222222", "cccc.tar", time.Minute),
		file("111111111111", ".upload-2", time.Minute), // being written
		file("111111111111", "notes.txt", 30*day),      // not ours to judge
	}
	rep, err := New(Config{Store: f.st, DataDir: f.dataDir, References: &References{}, TemplateFilesDir: root,
		Now: func() time.Time { return f.now }}).Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep[KindTemplateFiles] != len(gone) {
		t.Errorf("report %v, want %d template files", rep, len(gone))
	}
	for _, p := range gone {
		if exists(p) {
			t.Errorf("%s unused for longer than the max age: still there", p)
		}
	}
	for _, p := range kept {
		if !exists(p) {
			t.Errorf("%s removed", p)
		}
	}

	// A shorter max age takes the six-day-old files too.
	rep, err = New(Config{Store: f.st, DataDir: f.dataDir, TemplateFilesDir: root, TemplateFilesMaxAge: 5 * day,
		Now: func() time.Time { return f.now }}).Run(context.Background())
	if err != nil || rep[KindTemplateFiles] != 1 || exists(kept[0]) || !exists(kept[1]) {
		t.Errorf("max age 5 days: report %v, %v; %s there: %v", rep, err, kept[0], exists(kept[0]))
	}
}

// filesStore is a store that keeps template files (both SQL stores).
type filesStore interface {
	store.Store
	store.TemplateFiles
}

// useAfterList is the store as another replica changes it: right after
// GC lists the template files, use renews one of them.
type useAfterList struct {
	filesStore
	use func()
}

func (u useAfterList) ListTemplateFiles(ctx context.Context, account string) ([]store.TemplateFile, error) {
	l, err := u.filesStore.ListTemplateFiles(ctx, account)
	u.use()
	return l, err
}

// expireStoredTemplateFiles: a cluster's template files, in the store, go
// once unused for TemplateFilesMaxAge; a use on another replica after GC
// listed them keeps them, and only the account's own files of that hash.
func expireStoredTemplateFiles(t *testing.T, st filesStore) {
	ctx := context.Background()
	now := time.Now()
	const day = 24 * time.Hour
	const a, b = "111111111111", "222222222222"
	h := func(c string) string { return strings.Repeat(c, 64) }
	put := func(account, hash string, age time.Duration) {
		t.Helper()
		body := "tar bytes of " + account + hash
		if _, err := st.PutTemplateFile(ctx, account, hash, int64(len(body)), strings.NewReader(body), 0); err != nil {
			t.Fatal(err)
		}
		if err := st.TouchTemplateFile(ctx, account, hash, now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	put(a, h("a"), 8*day)  // unused: goes
	put(a, h("b"), 6*day)  // kept
	put(a, h("c"), 9*day)  // used after GC listed it: kept
	put(b, h("c"), 9*day)  // the same hash, another account, unused: goes
	put(b, h("d"), 30*day) // goes
	wrapped := useAfterList{st, func() {
		if err := st.TouchTemplateFile(ctx, a, h("c"), time.Now()); err != nil {
			t.Error(err)
		}
	}}
	rep, err := New(Config{Store: wrapped, Now: func() time.Time { return now }}).Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep[KindTemplateFiles] != 3 {
		t.Errorf("report %v, want 3 template files", rep)
	}
	left, err := st.ListTemplateFiles(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range left {
		got = append(got, f.Account+"/"+f.Hash[:1])
	}
	if want := a + "/b " + a + "/c"; strings.Join(got, " ") != want {
		t.Errorf("left %v, want %s", got, want)
	}
	if n, err := st.(store.Uploads).PruneUploadChunks(ctx, time.Now().Add(time.Hour)); err != nil || n != 0 {
		t.Errorf("the deletes left %d chunks (%v)", n, err)
	}
}

func TestCollectorExpiresStoredTemplateFilesSQLite(t *testing.T) {
	expireStoredTemplateFiles(t, newFixture(t).st.(filesStore))
}
