// Package sdk runs e2e.mjs, an end-to-end test of kiln's API with the
// official AWS SDK for JavaScript v3, against a server started here (with
// the fake backend: the flows that need no real VM). It skips when npm is
// missing, except in CI, where it must run.
package sdk

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

func TestJavaScriptSDK(t *testing.T) {
	npm, err := exec.LookPath("npm")
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skip("npm not installed")
		}
		t.Fatal("npm is required in CI")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("npm without node")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := os.Stat(filepath.Join("node_modules", "@aws-sdk", "client-lambda-microvms")); err != nil {
		cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci: %v\n%s", err, out)
		}
	}

	dir := t.TempDir()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	key, err := auth.NewAccessKey("123456789012", "sdk test")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAccessKey(ctx, key); err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(dir, "credentials")
	if err := auth.WriteCredentials(creds, "default", key); err != nil {
		t.Fatal(err)
	}
	be := fakebackend.New(api.NewReporter(st), 20*time.Millisecond)
	srv := api.NewServer(api.Config{}, st, be)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	defer func() { hs.Close(); be.Wait() }()

	cmd := exec.CommandContext(ctx, node, "e2e.mjs")
	cmd.Env = append(os.Environ(),
		"AWS_ENDPOINT_URL=http://"+ln.Addr().String(),
		"AWS_SHARED_CREDENTIALS_FILE="+creds,
		"AWS_CONFIG_FILE="+filepath.Join(dir, "no-config"),
		"AWS_REGION=us-east-1",
		"AWS_PROFILE=default",
		"AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "AWS_SESSION_TOKEN=",
		"AWS_EC2_METADATA_DISABLED=true",
	)
	out, err := cmd.CombinedOutput()
	t.Logf("e2e.mjs:\n%s", out)
	if err != nil {
		t.Fatalf("e2e.mjs failed: %v", err)
	}
}
