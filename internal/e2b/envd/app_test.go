//go:build linux

package envd

import (
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
)

// output runs a command through envd and returns its stdout and exit code.
func output(t *testing.T, url string, process map[string]any) (string, int) {
	t.Helper()
	ch := openStream(t, url, "Start", map[string]any{"process": process})
	var out strings.Builder
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev, ok := <-ch:
			if !ok || ev.Error != nil {
				t.Fatalf("stream ended without an End event: %+v (stdout %q)", ev.Error, out.String())
			}
			if ev.Data != nil {
				out.Write(ev.Data.Stdout)
			}
			if ev.End != nil {
				return out.String(), ev.End.ExitCode
			}
		case <-timeout:
			t.Fatal("no End event within 20 s")
		}
	}
}

// TestEnvdTemplateApp: commands start with the template's ENV, WORKDIR
// and USER, as E2B's do; the sandbox's env vars, then the command's own
// envs and cwd win over them. Before, they ran with the sandbox's env vars
// only, in the agent's directory, as root.
func TestEnvdTemplateApp(t *testing.T) {
	st := sandboxStore(t, map[string]string{"BOTH": "from the sandbox"})
	// nobody must reach it: t.TempDir's parent is private.
	wd, err := os.MkdirTemp("", "kiln-envd-wd-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(wd)
	os.Chmod(wd, 0o755)
	var appErr error
	h := New(Config{Agents: oneAgent{newAgent(t)}, Sandboxes: st,
		Target: func(context.Context) (string, string) { return "mvm-1", "acct" },
		App: func(_ context.Context, account, id string) (App, error) {
			if account != "acct" || id != "mvm-1" {
				t.Errorf("App asked for %s/%s", account, id)
			}
			return App{Env: []string{"PATH=/usr/bin:/bin", "TPL=from the template", "BOTH=from the template", "junk"},
				WorkingDir: wd, User: "nobody"}, appErr
		}})
	hs := httptest.NewServer(h)
	defer stopServer(hs)

	script := `echo "$TPL|$BOTH|$(pwd)|$(id -un)"`
	out, code := output(t, hs.URL, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", script}})
	if want := "from the template|from the sandbox|" + wd + "|nobody\n"; code != 0 || out != want {
		t.Fatalf("template defaults: exit %d, %q, want %q", code, out, want)
	}
	out, code = output(t, hs.URL, map[string]any{"cmd": "/bin/sh", "args": []string{"-c", script},
		"envs": map[string]string{"TPL": "from the command"}, "cwd": "/tmp"})
	if want := "from the command|from the sandbox|/tmp|nobody\n"; code != 0 || out != want {
		t.Fatalf("command overrides: exit %d, %q, want %q", code, out, want)
	}

	// Filesystem calls that name no user act as the template's USER too
	// (refused where nobody may not write); one naming root acts as root.
	if st, out := unary(t, hs, "MakeDir", "", map[string]any{"path": wd + "/by-default"}); st != 403 || out["code"] != "permission_denied" {
		t.Fatalf("MakeDir as the template's user in root's 0755 directory: %d %v", st, out)
	}
	shared := wd + "/shared"
	os.Mkdir(shared, 0o777)
	os.Chmod(shared, 0o777)
	if st, out := unary(t, hs, "MakeDir", "", map[string]any{"path": shared + "/by-default"}); st != 200 {
		t.Fatalf("MakeDir as the template's user: %d %v", st, out)
	}
	if uid := uidOf(t, shared+"/by-default"); uid != 65534 {
		t.Errorf("a directory made with no user named is owned by uid %d, want nobody's 65534", uid)
	}
	if st, out := unary(t, hs, "MakeDir", "root", map[string]any{"path": wd + "/by-root"}); st != 200 || uidOf(t, wd+"/by-root") != 0 {
		t.Errorf("MakeDir as root: %d %v", st, out)
	}

	// A template whose configuration cannot be read fails the command
	// rather than running it somewhere else.
	appErr = errors.New("disk gone")
	ch := openStream(t, hs.URL, "Start", map[string]any{"process": map[string]any{"cmd": "/bin/true"}})
	for ev := range ch {
		if ev.Start != nil {
			t.Fatal("a command started without its template's configuration")
		}
		if ev.Error != nil {
			if !strings.Contains(ev.Error.Message, "disk gone") {
				t.Fatalf("error %q does not say why", ev.Error.Message)
			}
			return
		}
	}
	t.Fatal("stream ended without an error")
}
