//go:build linux

// Package e2b runs e2b.mjs, an end-to-end test of kiln's E2B-compatible
// API with the official `e2b` npm package, unmodified and configured only
// through its documented settings (E2B_API_KEY, E2B_API_URL,
// E2B_SANDBOX_URL, E2B_DOMAIN, and Node's NODE_EXTRA_CA_CERTS), against a
// real `kiln server`: real microVMs (QEMU, TCG on hosts without a usable
// KVM), their networks and the HTTPS endpoint proxy that serves envd.
// Outside CI it skips when npm, root or the engine's set-up (`make setup`)
// is missing; in CI it fails instead.
package e2b

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

const template = kilntest.E2BTemplate

func TestE2BSDK(t *testing.T) {
	host := kilntest.Requirements(t, "E2B", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()

	npmErr := make(chan error, 1)
	go func() { npmErr <- kilntest.NpmInstall(ctx, host.Npm, ".", "e2b") }()
	work, bin, data := kilntest.WorkDir(t, "ke2b")
	kiln := filepath.Join(bin, "kiln")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{{kiln, "./cmd/kiln", false}, {filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true}} {
		if err := kilntest.GoBuild(ctx, b.out, b.pkg, b.static); err != nil {
			t.Fatal(err)
		}
	}
	codeZip, err := kilntest.E2BTemplateCode(work, host.Tools["busybox"])
	if err != nil {
		t.Fatal(err)
	}
	if err := <-npmErr; err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(host.KernelDir, filepath.Join(data, "kernel")); err != nil {
		t.Fatal(err)
	}
	// templates.mjs builds FROM debian: the managed debian-12 base is the
	// host's, shared with internal/imagebuild's tests, so CI debootstraps
	// it once. Run alone on a new host, the server builds it there.
	shared := filepath.Join(filepath.Dir(host.KernelDir), "base")
	if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(shared, filepath.Join(data, "base")); err != nil {
		t.Fatal(err)
	}
	t.Logf("set-up (npm ci, builds) took %v", time.Since(start).Round(100*time.Millisecond))

	endpointPort := kilntest.FreePort(t)
	srv := kilntest.StartServer(ctx, t, kiln, data, kilntest.FreePort(t), endpointPort, nil, "--metrics-addr", "127.0.0.1:"+kilntest.FreePort(t))
	defer srv.Stop(t)
	admin := srv.AdminAccount(t)

	// The template: a kiln image of the admin account, built through the
	// AWS API as any image is.
	creds, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	aws := awscli.NewClient(srv.APIURL, "us-east-1", creds)
	img, _ := json.Marshal(map[string]any{"name": template, "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::" + admin + ":role/build", "codeArtifact": map[string]string{"uri": kilntest.FileURI(codeZip)},
		"resources": []map[string]any{{"minimumMemoryInMiB": 512}}})
	if _, err := aws.Do(ctx, "POST", "/"+api.APIVersion+"/microvm-images", nil, img); err != nil {
		t.Fatalf("CreateMicrovmImage: %v", err)
	}
	for {
		b, err := aws.Do(ctx, "GET", "/"+api.APIVersion+"/microvm-images/"+template, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		var out struct{ State string }
		json.Unmarshal(b, &out)
		if out.State == "CREATED" {
			break
		}
		if out.State != "CREATING" {
			t.Fatalf("template image is %s: %s", out.State, b)
		}
		time.Sleep(500 * time.Millisecond)
	}

	// E2B keys: one of the admin account (its sandboxes are the admin's
	// microVMs), one of another account.
	global := []string{"--data-dir", data}
	key, otherKey := kilntest.E2BKey(ctx, t, kiln, global, "--account", admin), kilntest.E2BKey(ctx, t, kiln, global)

	idFile := filepath.Join(work, "sandbox-id")
	env := append(os.Environ(),
		// The SDK's own settings, and Node's for kiln's CA.
		"E2B_API_KEY="+key,
		"E2B_API_URL="+srv.APIURL,
		"E2B_SANDBOX_URL=https://127.0.0.1:"+endpointPort,
		"E2B_DOMAIN=microvm.localhost",
		"NODE_EXTRA_CA_CERTS="+filepath.Join(data, "ca.pem"),
		"KILN_TEMPLATE="+template,
		"KILN_OTHER_KEY="+otherKey,
		"KILN_SANDBOX_ID_FILE="+idFile,
		"KILN_BIN="+kiln,
		"KILN_DATA_DIR="+data,
	)
	// e2b.mjs first, then every other script (one per area of the API)
	// against the same server and template; lib.mjs is their shared code.
	kilntest.RunE2BScripts(ctx, t, host.Node, env)

	// The sandbox was a microVM of the key's account: ListMicrovms of the
	// admin (AWS API, SigV4) shows it, killed through E2B.
	id, err := os.ReadFile(idFile)
	if err != nil {
		t.Fatalf("the script recorded no sandbox: %v", err)
	}
	b, err := aws.Do(ctx, "GET", "/"+api.APIVersion+"/microvms", url.Values{"maxResults": {"50"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Items []struct{ MicrovmID, State, ImageArn string }
	}
	json.Unmarshal(b, &list)
	found := false
	for _, m := range list.Items {
		if m.MicrovmID == string(id) {
			found = true
			if m.State != "TERMINATED" && m.State != "TERMINATING" {
				t.Errorf("sandbox %s is %s after sandbox.kill()", id, m.State)
			}
			if want := fmt.Sprintf("arn:aws:lambda:us-east-1:%s:microvm-image:%s", admin, template); m.ImageArn != want {
				t.Errorf("sandbox %s runs %s, want %s", id, m.ImageArn, want)
			}
		}
	}
	if !found {
		t.Errorf("sandbox %s is not among the account's microVMs: %s", id, b)
	}
}
