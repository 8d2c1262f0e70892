//go:build linux

// Package console runs console.mjs, a puppeteer-core test of kiln's web
// console in Debian's Chromium (over the DevTools Protocol) and Debian's
// Firefox ESR (over WebDriver BiDi), both headless, against one real `kiln
// server`: the binaries built from this tree with the console's assets
// embedded, real microVMs (QEMU, TCG on hosts without a usable KVM), their
// networks and the HTTPS endpoint proxy. Outside CI it skips when node, a
// browser, root or the engine's set-up (`make setup`) is missing; in CI it
// fails instead.
package console

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

func TestWebConsole(t *testing.T) {
	host := kilntest.Requirements(t, "console", "chromium", "firefox-esr")
	node, npm, kernelDir := host.Node, host.Npm, host.KernelDir
	browsers := "chromium=" + host.Tools["chromium"] + ",firefox=" + host.Tools["firefox-esr"]
	// While working on one browser: KILN_CONSOLE_BROWSERS=firefox=/usr/bin/firefox-esr.
	if b := os.Getenv("KILN_CONSOLE_BROWSERS"); b != "" {
		browsers = b
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	start := time.Now()

	npmErr := make(chan error, 1)
	go func() { npmErr <- kilntest.NpmInstall(ctx, npm, ".", "puppeteer-core") }()
	// The server must embed the console's assets: build them if this
	// tree has not yet (`make build` does it before `make test`).
	if _, err := os.Stat("../../internal/console/dist/index.html"); err != nil {
		cmd := exec.CommandContext(ctx, "make", "console")
		cmd.Dir = filepath.Join("..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building the console's assets (make console): %v\n%s", err, out)
		}
	}

	work, bin, data := kilntest.WorkDir(t, "kcon")
	kiln, app := filepath.Join(bin, "kiln"), filepath.Join(work, "app")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{
		{kiln, "./cmd/kiln", false},
		{filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true},
		{app, "./test/console/testdata/app", true},
	} {
		if err := kilntest.GoBuild(ctx, b.out, b.pkg, b.static); err != nil {
			t.Fatal(err)
		}
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox (busybox-static) is needed for the shell in the test image: run `make setup`")
	}
	codeZip := filepath.Join(work, "app.zip")
	// FROM scratch: no build VM, so the build takes seconds; busybox gives
	// the browser shell its /bin/sh (and stty, to see the resize).
	dockerfile := "FROM scratch\nCOPY app /app\nCOPY bin /bin\nENV PATH=/bin VERSION=1\nCMD [\"/app\"]\n"
	if err := kilntest.CodePackage(codeZip, dockerfile, map[string]string{"app": app, "bin/sh": busybox, "bin/stty": busybox}); err != nil {
		t.Fatal(err)
	}
	if err := <-npmErr; err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(kernelDir, filepath.Join(data, "kernel")); err != nil {
		t.Fatal(err)
	}
	t.Logf("set-up (npm ci, builds) took %v", time.Since(start).Round(100*time.Millisecond))

	srv := kilntest.StartServer(ctx, t, kiln, data, kilntest.FreePort(t), kilntest.FreePort(t), nil)
	defer srv.Stop(t)

	admin, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	adminAccount := kilntest.AccountOf(ctx, t, kiln, data, admin.AccessKeyID)
	keyOut, err := exec.CommandContext(ctx, kiln, "--data-dir", data, "keys", "create", "--description", "console test tenant").Output()
	if err != nil {
		t.Fatalf("kiln keys create: %v", err)
	}
	var tenant struct{ AccessKeyID, SecretAccessKey string }
	if err := json.Unmarshal(keyOut, &tenant); err != nil || tenant.AccessKeyID == "" {
		t.Fatalf("kiln keys create printed %q: %v", keyOut, err)
	}

	shots := os.Getenv("KILN_CONSOLE_SHOTS")
	if shots == "" {
		shots, _ = filepath.Abs("screenshots")
	}
	os.RemoveAll(shots)
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots go to %s (a folder per browser)", shots)
	// Firefox refuses to run as root with a HOME that root does not own.
	ffHome := filepath.Join(work, "firefox-home")
	if err := os.MkdirAll(ffHome, 0o700); err != nil {
		t.Fatal(err)
	}
	scriptStart := time.Now()
	cmd := exec.CommandContext(ctx, node, "console.mjs")
	cmd.Env = append(os.Environ(),
		"KILN_CONSOLE_URL="+srv.APIURL+"/console/",
		"KILN_ADMIN_ID="+admin.AccessKeyID, "KILN_ADMIN_SECRET="+admin.SecretAccessKey, "KILN_ADMIN_ACCOUNT="+adminAccount,
		"KILN_TENANT_ID="+tenant.AccessKeyID, "KILN_TENANT_SECRET="+tenant.SecretAccessKey,
		"KILN_CODE_ZIP="+codeZip, "KILN_SHOTS="+shots, "KILN_BROWSERS="+browsers, "KILN_FIREFOX_HOME="+ffHome,
	)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("console.mjs (%v):\n%s", time.Since(scriptStart).Round(100*time.Millisecond), out)
	if err != nil {
		t.Errorf("console.mjs failed: %v (screenshots in %s)", err, shots)
	}
}
