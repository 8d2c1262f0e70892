package e2b

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestImportFiles: the tags, builds and snapshot records an older kiln
// kept as files of its data dir are in the store after one start (and
// served from it), the files renamed *.imported; records of images gone
// since are dropped, a file that cannot be read stays, and a second start
// imports nothing again.
func TestImportFiles(t *testing.T) {
	e, dir := newTemplateEnv(t)
	root := filepath.Join(dir, "e2b-templates")
	const started, waiting, orphan = "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002", "00000000-0000-4000-8000-000000000003"
	at := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	files := map[string]any{
		"builds/" + e.account + "/" + started + ".json": map[string]any{"id": started, "template": "tmpl", "tags": []string{"v1"}, "version": "1.0", "createdAt": at},
		"builds/" + e.account + "/" + waiting + ".json": map[string]any{"id": waiting, "template": "later", "memoryMB": 1024, "createdAt": at},
		"builds/" + e.account + "/" + orphan + ".json":  map[string]any{"id": orphan, "template": "gone", "version": "1.0", "createdAt": at},
		"tags/" + e.account + "/tmpl.json":              []map[string]any{{"tag": "prod", "buildID": started, "version": "1.0", "createdAt": at}},
		"tags/" + e.account + "/gone.json":              []map[string]any{{"tag": "prod", "buildID": orphan, "version": "1.0", "createdAt": at}},
		"snapshots/" + e.account + "/tmpl.json":         map[string]any{"name": "tmpl", "sandboxID": "mvm-1", "templateID": "base", "envVars": map[string]string{"K": "v"}, "createdAt": at},
		// Another account's folder names A's template: it has no image of
		// that name, so nothing of it reaches A's (or its own) records.
		"tags/111111111111/tmpl.json": []map[string]any{{"tag": "evil", "buildID": orphan, "version": "1.0", "createdAt": at}},
	}
	for name, v := range files {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o700)
		b, _ := json.Marshal(v)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(root, "versions", e.account, "tmpl"), 0o700)
	os.WriteFile(filepath.Join(root, "versions", e.account, "tmpl", "1.0"), []byte(started), 0o600)
	bad := filepath.Join(root, "tags", e.account, "bad.json")
	os.WriteFile(bad, []byte("{"), 0o600)

	st, err := e.srv.ImportFiles(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st != (ImportStats{Tags: 1, Builds: 2, Snapshots: 1, Skipped: 5}) {
		// Skipped: the orphan build, the version index its build file
		// holds, gone.json, the other account's, bad.json.
		t.Errorf("ImportFiles = %+v", st)
	}
	for name := range files {
		p := filepath.Join(root, name)
		if _, err := os.Stat(p + importedSuffix); err != nil {
			t.Errorf("%s was not renamed: %v", name, err)
		}
	}
	if _, err := os.Stat(bad); err != nil {
		t.Errorf("an unreadable file was moved: %v", err)
	}

	// Served from the store.
	a := e.do(e.key, "GET", "/templates/tmpl/tags", nil)
	e.want(a, 200, "tags")
	if !strings.Contains(string(a.body), `"tag":"prod"`) || !strings.Contains(string(a.body), started) || strings.Contains(string(a.body), "evil") {
		t.Errorf("tags after import: %s", a.body)
	}
	e.want(e.do(e.key, "GET", "/templates/tmpl/builds/"+started+"/status", nil), 200, "imported build")
	a = e.do(e.key, "GET", "/templates/later/builds/"+waiting+"/status", nil)
	e.want(a, 200, "imported build not started")
	if !strings.Contains(string(a.body), `"waiting"`) {
		t.Errorf("status of a build not started: %s", a.body)
	}
	e.want(e.do(e.key, "GET", "/templates/gone/builds/"+orphan+"/status", nil), 404, "build of a deleted template")
	e.want(e.do(e.otherKey, "GET", "/templates/tmpl/builds/"+started+"/status", nil), 404, "another account's build")
	a = e.do(e.key, "GET", "/snapshots", nil)
	e.want(a, 200, "snapshots")
	if !strings.Contains(string(a.body), `"snapshotID":"tmpl"`) {
		t.Errorf("snapshots after import: %s", a.body)
	}
	a = e.do(e.key, "GET", "/templates/tmpl", nil)
	e.want(a, 200, "template")
	if !strings.Contains(string(a.body), started) {
		t.Errorf("the version index was not imported: %s", a.body)
	}

	if st, err := e.srv.ImportFiles(t.Context()); err != nil || st != (ImportStats{Skipped: 1}) {
		t.Errorf("a second ImportFiles = %+v, %v; want only bad.json skipped", st, err)
	}
}
