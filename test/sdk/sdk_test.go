//go:build linux

// Package sdk runs e2e.mjs, an end-to-end test of kiln's API with the
// official AWS SDK for JavaScript v3, against a real `kiln server`: the
// binaries built from this tree, real microVMs (QEMU, TCG on hosts without
// a usable KVM), their networks and the HTTPS endpoint proxy. Outside CI it
// skips when npm, root or the engine's set-up (`make setup`) is missing;
// in CI it fails instead.
package sdk

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/test/kilntest"
)

func TestJavaScriptSDK(t *testing.T) {
	host := kilntest.Requirements(t, "SDK")
	node, npm, kernelDir := host.Node, host.Npm, host.KernelDir
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()

	// npm ci (network) runs while the binaries compile (CPU).
	npmErr := make(chan error, 1)
	go func() { npmErr <- kilntest.NpmInstall(ctx, npm, ".", npmMarker) }()

	work, bin, data := kilntest.WorkDir(t, "ksdk")
	kiln := filepath.Join(bin, "kiln")
	app := filepath.Join(work, "app")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{
		{kiln, "./cmd/kiln", false},
		// The server finds the guest agent next to its own binary.
		{filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true},
		{app, "./test/sdk/testdata/app", true},
	} {
		if err := kilntest.GoBuild(ctx, b.out, b.pkg, b.static); err != nil {
			t.Fatal(err)
		}
	}
	code1, code2 := filepath.Join(work, "app-v1.zip"), filepath.Join(work, "app-v2.zip")
	for i, zp := range []string{code1, code2} {
		if err := kilntest.CodePackage(zp, fmt.Sprintf("FROM scratch\nCOPY app /app\nENV VERSION=%d\nCMD [\"/app\"]\n", i+1), map[string]string{"app": app}); err != nil {
			t.Fatal(err)
		}
	}
	// Version 1 comes from a real S3-compatible store, as on AWS: kiln
	// server reads it with --s3-endpoint and the standard AWS chain.
	s3srv := startS3(ctx, t, work)
	s3URI, err := s3srv.put(ctx, "kiln-code", "apps/app-v1.zip", code1)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-npmErr; err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(kernelDir, filepath.Join(data, "kernel")); err != nil {
		t.Fatal(err)
	}
	t.Logf("set-up (npm ci, builds) took %v", time.Since(start).Round(100*time.Millisecond))

	// Execution roles: the roles file maps a role of the admin account to
	// a profile of the server's AWS configuration holding the S3 store's
	// keys. The account exists once the server started; the server
	// re-reads the file when it changes.
	rolesFile, roleCreds := filepath.Join(work, "roles.json"), filepath.Join(work, "role-credentials")
	if err := os.WriteFile(rolesFile, []byte(`{"roles":{}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(roleCreds, []byte("[kiln-vm-role]\naws_access_key_id = "+s3srv.AccessKey+"\naws_secret_access_key = "+s3srv.SecretKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := kilntest.StartServer(ctx, t, kiln, data, kilntest.FreePort(t), kilntest.FreePort(t),
		append(s3srv.Env(), "AWS_SHARED_CREDENTIALS_FILE="+roleCreds, "AWS_CONFIG_FILE="+filepath.Join(work, "no-config")),
		"--s3-endpoint", s3srv.Endpoint, "--roles-file", rolesFile)
	defer srv.Stop(t)
	roleARN := "arn:aws:iam::" + srv.AdminAccount(t) + ":role/kiln-vm-role"
	if err := os.WriteFile(rolesFile, []byte(`{"roles":{"`+roleARN+`":{"profile":"kiln-vm-role"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	imdsOut := filepath.Join(work, "imds-credentials.json")

	// A second account, for the isolation checks.
	keyOut, err := exec.CommandContext(ctx, kiln, "--data-dir", data, "keys", "create", "--description", "sdk test tenant").Output()
	if err != nil {
		t.Fatalf("kiln keys create: %v", err)
	}
	var tenant struct{ AccessKeyID, SecretAccessKey string }
	if err := json.Unmarshal(keyOut, &tenant); err != nil || tenant.AccessKeyID == "" {
		t.Fatalf("kiln keys create printed %q: %v", keyOut, err)
	}

	t.Logf("running e2e.mjs against %s (endpoints on %s)", srv.APIURL, srv.EndpointAddr)
	scriptStart := time.Now()
	cmd := exec.CommandContext(ctx, node, "e2e.mjs")
	cmd.Env = append(os.Environ(),
		"AWS_ENDPOINT_URL="+srv.APIURL,
		"AWS_SHARED_CREDENTIALS_FILE="+filepath.Join(data, "credentials"),
		"AWS_CONFIG_FILE="+filepath.Join(work, "no-config"),
		"AWS_REGION=us-east-1",
		"AWS_PROFILE=default",
		"AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "AWS_SESSION_TOKEN=",
		"AWS_EC2_METADATA_DISABLED=true",
		"KILN_CODE_URI="+s3URI,
		"KILN_HOST_CODE_URI="+kilntest.FileURI(code1),
		"KILN_ROLE_ARN="+roleARN,
		"KILN_IMDS_OUT="+imdsOut,
		"KILN_CODE_URI_2="+kilntest.FileURI(code2),
		"KILN_CA="+filepath.Join(data, "ca.pem"),
		"KILN_TENANT_KEY_ID="+tenant.AccessKeyID,
		"KILN_TENANT_SECRET="+tenant.SecretAccessKey,
	)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("e2e.mjs (%v):\n%s", time.Since(scriptStart).Round(100*time.Millisecond), out)
	if err != nil {
		t.Errorf("e2e.mjs failed: %v", err)
	}
	// The credentials the guest got from its metadata service sign a
	// request that the S3 store accepts (and a wrong secret is refused);
	// checked whenever e2e.mjs got that far.
	if _, statErr := os.Stat(imdsOut); err == nil || statErr == nil {
		s3srv.checkCredentials(ctx, t, imdsOut, "kiln-code", "apps/app-v1.zip")
	}
}

// npmMarker is the package whose presence means `npm ci` ran.
const npmMarker = "@aws-sdk/client-lambda-microvms"

// TestModelExtractUpToDate checks that internal/api/testdata/aws-model.json,
// against which kiln's validation table is tested, is what model.mjs
// extracts from the installed SDK (`node model.mjs >
// ../../internal/api/testdata/aws-model.json` after an SDK update).
func TestModelExtractUpToDate(t *testing.T) {
	node, err := exec.LookPath("node")
	npm, err2 := exec.LookPath("npm")
	if err != nil || err2 != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("in CI node and npm must be installed")
		}
		t.Skip("node or npm is not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := kilntest.NpmInstall(ctx, npm, ".", npmMarker); err != nil {
		t.Fatal(err)
	}
	got, err := exec.CommandContext(ctx, node, "model.mjs").Output()
	if err != nil {
		t.Fatalf("node model.mjs: %v", err)
	}
	want, err := os.ReadFile(filepath.Join("..", "..", "internal", "api", "testdata", "aws-model.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("internal/api/testdata/aws-model.json is stale: run `node model.mjs > ../../internal/api/testdata/aws-model.json` in test/sdk")
	}
}
