package engine

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestApp: a version's app configuration is kept beside its template
// pointer and read back; a version without one is not found, and an
// oversized or broken file is an error, not a half-read configuration.
func TestApp(t *testing.T) {
	e := &Engine{cfg: Config{DataDir: t.TempDir()}}
	if _, found, err := e.App("acct", "img", "1"); found || err != nil {
		t.Fatalf("no app.json: found %v, %v", found, err)
	}
	want := AppConfig{Env: []string{"PATH=/bin", "A=b"}, WorkingDir: "/opt/app", User: "user"}
	if err := e.SetApp("acct", "img", "1", want); err != nil {
		t.Fatal(err)
	}
	if got, found, err := e.App("acct", "img", "1"); !found || err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("App = %+v, %v, %v; want %+v", got, found, err, want)
	}
	if _, found, _ := e.App("other", "img", "1"); found {
		t.Fatal("another account's version has the app")
	}
	p := filepath.Join(e.imageDir("acct", "img", "1"), appFile)
	os.WriteFile(p, []byte(strings.Repeat(" ", MaxAppFile+1)), 0o600)
	if _, _, err := e.App("acct", "img", "1"); err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("oversized app.json: %v", err)
	}
	os.WriteFile(p, []byte("{"), 0o600)
	if _, _, err := e.App("acct", "img", "1"); err == nil {
		t.Fatal("a broken app.json read without error")
	}
}
