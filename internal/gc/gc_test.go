package gc

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// dirEngine is the engine's file layout without VMs: version files under
// DATA_DIR/images/A/I/V with a template pointer, as internal/engine keeps
// them. (A fake of our own interface; the VM parts are tested in
// internal/engine against real VMs.)
type dirEngine struct{ dataDir string }

func (e dirEngine) ImageDir(account, image, version string) string {
	return filepath.Join(e.dataDir, "images", account, image, version)
}

func (e dirEngine) TemplateFor(account, image, version string) (string, error) {
	b, err := os.ReadFile(filepath.Join(e.ImageDir(account, image, version), "template"))
	if err != nil {
		return "", errdefs.ErrNotFound
	}
	return strings.TrimSpace(string(b)), nil
}

func (dirEngine) SweepVMs(context.Context) ([]string, error)       { return nil, nil }
func (dirEngine) SweepSuspended(context.Context) ([]string, error) { return nil, nil }

type fixture struct {
	t       *testing.T
	dataDir string
	st      store.Store
	eng     dirEngine
	now     time.Time
}

func newFixture(t *testing.T) *fixture {
	dir := t.TempDir()
	st, err := sqlite.Open(context.Background(), filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &fixture{t: t, dataDir: dir, st: st, eng: dirEngine{dir}, now: time.Now()}
}

// artifact writes an uploaded package aged age and returns its file:// URI.
func (f *fixture) artifact(account, name string, age time.Duration) (string, string) {
	p := filepath.Join(f.dataDir, "artifacts", account, name)
	os.MkdirAll(filepath.Dir(p), 0o700)
	if err := os.WriteFile(p, []byte("PK\x03\x04"), 0o600); err != nil {
		f.t.Fatal(err)
	}
	at := f.now.Add(-age)
	os.Chtimes(p, at, at)
	return p, (&url.URL{Scheme: "file", Path: p}).String()
}

// version records image:1 of account with the artifact uri, in state, with
// its files (a template) when withFiles.
func (f *fixture) version(account, image, uri, state string, withFiles bool) string {
	now := f.now.UTC()
	img := store.Image{Account: account, Name: image, ARN: "arn:" + image, State: store.ImageCreated, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: account, ImageName: image, ImageARN: img.ARN, Version: "1", State: state, Status: store.VersionActive,
		Config: store.ImageConfig{CodeArtifact: &store.CodeArtifact{URI: uri}}, CreatedAt: now, UpdatedAt: now}
	if err := f.st.CreateImage(context.Background(), img, v, nil, nil); err != nil {
		f.t.Fatal(err)
	}
	dir := f.eng.ImageDir(account, image, "1")
	if withFiles {
		tmpl := filepath.Join(dir, "build-1", "template")
		os.MkdirAll(tmpl, 0o700)
		os.WriteFile(filepath.Join(tmpl, "template.json"), []byte("{}"), 0o600)
		os.WriteFile(filepath.Join(dir, "template"), []byte(tmpl+"\n"), 0o600)
	}
	return dir
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func TestCollectorRemovesOnlyUnreferenced(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	const acct = "111111111111"
	refOld, refURI := f.artifact(acct, "aaaa.zip", 72*time.Hour)
	orphanOld, _ := f.artifact(acct, "bbbb.zip", 72*time.Hour)
	orphanNew, _ := f.artifact(acct, "cccc.zip", time.Minute) // just uploaded
	staleUpload, _ := f.artifact(acct, ".upload-123", 48*time.Hour)
	liveDir := f.version(acct, "app", refURI, store.VersionSuccessful, true)
	goneDir := f.version(acct, "lost", refURI, store.VersionSuccessful, false) // its files vanished
	orphanDir := filepath.Join(f.dataDir, "images", acct, "deleted", "3")
	os.MkdirAll(filepath.Join(orphanDir, "build-x"), 0o700)
	// A deleted version's files stay while a microVM runs from them.
	usedDir := filepath.Join(f.dataDir, "images", acct, "deleted-used", "1")
	os.MkdirAll(usedDir, 0o700)
	m := store.Microvm{ID: "mvm-1", Account: acct, State: store.StateRunning, ImageName: "deleted-used", ImageVersion: "1",
		StartedAt: f.now, UpdatedAt: f.now, DeadlineAt: f.now.Add(time.Hour)}
	if err := f.st.CreateMicrovm(ctx, m, nil); err != nil {
		t.Fatal(err)
	}
	// Terminated two days ago, and an hour ago.
	for i, age := range []time.Duration{48 * time.Hour, time.Hour} {
		id := fmt.Sprintf("mvm-t%d", i)
		at := f.now.Add(-age)
		m := store.Microvm{ID: id, Account: acct, State: store.StatePending, StartedAt: at, UpdatedAt: at, DeadlineAt: at}
		f.st.CreateMicrovm(ctx, m, nil)
		f.st.UpdateMicrovm(ctx, acct, id, nil, func(m *store.Microvm) error { m.SetState(store.StateTerminated, "test", at); return nil })
	}
	before := testutil.ToFloat64(metrics.GCRemovals.WithLabelValues(KindArtifact))

	c := New(Config{Store: f.st, DataDir: f.dataDir, Engine: f.eng, References: &References{}})
	rep, err := c.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("report: %v", rep)
	for _, tt := range []struct {
		name string
		path string
		want bool
	}{
		{"referenced artifact", refOld, true},
		{"unreferenced old artifact", orphanOld, false},
		{"unreferenced fresh upload", orphanNew, true},
		{"abandoned partial upload", staleUpload, false},
		{"version files", liveDir, true},
		{"dir of a version whose record is gone", orphanDir, false},
		{"dir of a deleted version a microVM uses", usedDir, true},
	} {
		if got := exists(tt.path); got != tt.want {
			t.Errorf("%s (%s): exists=%v, want %v", tt.name, tt.path, got, tt.want)
		}
	}
	_ = goneDir
	v, err := f.st.GetImageVersion(ctx, acct, "lost", "1")
	if err != nil || v.State != store.VersionFailed || !strings.HasPrefix(v.StateReason, ReasonTemplateGone) {
		t.Errorf("version whose files vanished: %s %q %v, want FAILED, %s...", v.State, v.StateReason, err, ReasonTemplateGone)
	}
	if v, _ := f.st.GetImageVersion(ctx, acct, "app", "1"); v.State != store.VersionSuccessful {
		t.Errorf("intact version became %s (%s)", v.State, v.StateReason)
	}
	if _, err := f.st.GetMicrovm(ctx, acct, "mvm-t0"); err == nil {
		t.Error("a record terminated 48h ago is still there")
	}
	if _, err := f.st.GetMicrovm(ctx, acct, "mvm-t1"); err != nil {
		t.Errorf("a record terminated 1h ago went: %v", err)
	}
	if rep[KindArtifact] != 2 || rep[KindVersionDir] != 1 || rep[KindTerminated] != 1 || rep[KindVersionFailed] != 1 {
		t.Errorf("report %v", rep)
	}
	if got := testutil.ToFloat64(metrics.GCRemovals.WithLabelValues(KindArtifact)) - before; got != 2 {
		t.Errorf("kiln_gc_removals_total{kind=artifact} moved by %v, want 2", got)
	}
}

// TestCollectorRacesNewReferences runs GC in a tight loop while versions
// that name old uploads and own new directories are created, as the API
// and the engine do (record under References, then files): no referenced
// artifact or version directory is ever removed. Without References, GC
// lists the records before a version is recorded and removes its
// artifact or its new directory.
func TestCollectorRacesNewReferences(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	refs := &References{}
	c := New(Config{Store: f.st, DataDir: f.dataDir, Engine: f.eng, References: refs, ArtifactGrace: time.Nanosecond})
	// A slow pass: the records read, the files not yet judged.
	testHookListed = func() { time.Sleep(2 * time.Millisecond) }
	defer func() { testHookListed = nil }()
	var passes atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := c.Run(ctx); err != nil && ctx.Err() == nil {
				t.Errorf("gc: %v", err)
			}
			passes.Add(1)
		}
	}()
	const acct = "222222222222"
	type ref struct{ artifact, dir string }
	var refs2 []ref
	for i := 0; i < 200; i++ {
		p, uri := f.artifact(acct, fmt.Sprintf("%064d.zip", i), 72*time.Hour)
		img := fmt.Sprintf("img%d", i)
		release := refs.Hold()
		now := time.Now().UTC()
		err := f.st.CreateImage(ctx, store.Image{Account: acct, Name: img, ARN: "arn:" + img, State: store.ImageCreating, LatestVersion: "1", CreatedAt: now, UpdatedAt: now},
			store.ImageVersion{Account: acct, ImageName: img, Version: "1", State: store.VersionPending, Status: store.VersionActive,
				Config: store.ImageConfig{CodeArtifact: &store.CodeArtifact{URI: uri}}, CreatedAt: now, UpdatedAt: now}, nil, nil)
		release()
		if err != nil {
			t.Fatal(err)
		}
		if !exists(p) {
			// GC may take an old unreferenced upload before it is named;
			// the API then refuses nothing, and the build says so. What
			// must never happen is below: a named one going.
			continue
		}
		// The build makes the version's directory after the record.
		dir := filepath.Join(f.eng.ImageDir(acct, img, "1"), "build-1")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		refs2 = append(refs2, ref{p, dir})
		if i%10 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	// Let GC run over all of them a few more times.
	for start := passes.Load(); passes.Load() < start+3; {
		time.Sleep(time.Millisecond)
	}
	cancel()
	wg.Wait()
	t.Logf("%d gc passes, %d references checked", passes.Load(), len(refs2))
	if len(refs2) == 0 {
		t.Fatal("no reference survived to be checked")
	}
	for _, r := range refs2 {
		if !exists(r.artifact) {
			t.Errorf("referenced artifact removed: %s", r.artifact)
		}
		if !exists(r.dir) {
			t.Errorf("version directory removed: %s", r.dir)
		}
	}
}

// FuzzLocalPath: a code artifact URI comes from a tenant; whatever it
// holds, localPath yields "" or a clean absolute path (never one that
// climbs out with ..).
func FuzzLocalPath(f *testing.F) {
	for _, s := range []string{"file:///var/lib/kiln/artifacts/1/a.zip", "/x/../../etc/passwd", "s3://b/k", "file://host/x", "file:///a/%2e%2e/b", "", "::", "file:relative"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		p := localPath(uri)
		if p == "" || p == "." {
			return
		}
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.Contains(p, "/../") || strings.HasSuffix(p, "/..") {
			t.Fatalf("localPath(%q) = %q: not clean", uri, p)
		}
	})
}

// TestCollectorRemovesUnreferencedStoreUploads: a cluster's uploads, in
// the store, follow the rule of upload files: kept while a version names
// them or younger than the grace, else removed.
func TestCollectorRemovesUnreferencedStoreUploads(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	up := f.st.(store.Uploads)
	const acct = "111111111111"
	put := func(body string, age time.Duration) store.Upload {
		u, err := up.PutUpload(ctx, acct, "", int64(len(body)), strings.NewReader(body), nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := up.TouchUpload(ctx, acct, u.SHA256, f.now.Add(-age)); err != nil {
			t.Fatal(err)
		}
		return u
	}
	ref := put("PK\x03\x04 referenced", 72*time.Hour)
	orphan := put("PK\x03\x04 orphan", 72*time.Hour)
	fresh := put("PK\x03\x04 fresh", time.Minute)
	f.version(acct, "app", ref.URI(), store.VersionSuccessful, true)

	rep, err := New(Config{Store: f.st, DataDir: f.dataDir, References: &References{}, Now: func() time.Time { return f.now }}).Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep[KindArtifact] != 1 {
		t.Errorf("report %v, want 1 artifact", rep)
	}
	for _, tt := range []struct {
		name string
		u    store.Upload
		want bool
	}{{"referenced", ref, true}, {"unreferenced old", orphan, false}, {"unreferenced fresh", fresh, true}} {
		_, _, err := up.OpenUpload(ctx, acct, tt.u.SHA256)
		if got := err == nil; got != tt.want {
			t.Errorf("%s upload: present=%v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestFailStuckVersions: a version left IN_PROGRESS with only finished
// builds (a snapshot kiln stopped in the middle of) becomes FAILED, and
// its image CREATE_FAILED, once StuckAfter has passed; a younger one (a
// snapshot another replica is making) and one whose build still runs stay.
func TestFailStuckVersions(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	const acct = "111111111111"
	mk := func(name string, age time.Duration, buildState string) {
		at := f.now.Add(-age).UTC()
		img := store.Image{Account: acct, Name: name, ARN: "arn:" + name, State: store.ImageCreating, LatestVersion: "1", CreatedAt: at, UpdatedAt: at}
		v := store.ImageVersion{Account: acct, ImageName: name, ImageARN: img.ARN, Version: "1", State: store.VersionInProgress,
			Status: store.VersionActive, CreatedAt: at, UpdatedAt: at}
		mem := int64(256 << 20)
		b := store.Build{Account: acct, ImageName: name, ImageARN: img.ARN, Version: "1", ID: "b-" + name, State: buildState,
			CreatedAt: at, UpdatedAt: at, Snapshot: &store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem}}
		if err := f.st.CreateImage(ctx, img, v, []store.Build{b}, nil); err != nil {
			t.Fatal(err)
		}
	}
	mk("interrupted", 2*StuckAfter, store.BuildSuccessful)
	mk("young", StuckAfter/2, store.BuildSuccessful)
	mk("building", 2*StuckAfter, store.BuildInProgress)
	c := New(Config{Store: f.st, DataDir: f.dataDir, References: &References{}, Now: func() time.Time { return f.now }})
	rep, err := c.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep[KindVersionStuck] != 1 {
		t.Errorf("report %v, want one %s", rep, KindVersionStuck)
	}
	v, err := f.st.GetImageVersion(ctx, acct, "interrupted", "1")
	if err != nil || v.State != store.VersionFailed || !strings.HasPrefix(v.StateReason, ReasonInterrupted) {
		t.Errorf("interrupted version: %s %q %v, want FAILED, %s...", v.State, v.StateReason, err, ReasonInterrupted)
	}
	if img, err := f.st.GetImage(ctx, acct, "interrupted"); err != nil || img.State != store.ImageCreateFailed {
		t.Errorf("its image: %s %v, want %s", img.State, err, store.ImageCreateFailed)
	}
	for _, name := range []string{"young", "building"} {
		if v, err := f.st.GetImageVersion(ctx, acct, name, "1"); err != nil || v.State != store.VersionInProgress {
			t.Errorf("%s: %s %v, want it left IN_PROGRESS", name, v.State, err)
		}
	}
}
