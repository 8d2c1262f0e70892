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
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

const readyLine = "kiln API serving at "

func TestWebConsole(t *testing.T) {
	node, npm, browsers, kernelDir := requirements(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	start := time.Now()

	npmErr := make(chan error, 1)
	go func() { npmErr <- npmInstall(ctx, npm) }()
	// The server must embed the console's assets: build them if this
	// tree has not yet (`make build` does it before `make test`).
	if _, err := os.Stat("../../internal/console/dist/index.html"); err != nil {
		cmd := exec.CommandContext(ctx, "make", "console")
		cmd.Dir = filepath.Join("..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building the console's assets (make console): %v\n%s", err, out)
		}
	}

	work, err := os.MkdirTemp("", "kcon")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	bin, data := filepath.Join(work, "bin"), filepath.Join(work, "d")
	for _, d := range []string{bin, data} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	kiln, app := filepath.Join(bin, "kiln"), filepath.Join(work, "app")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{
		{kiln, "./cmd/kiln", false},
		{filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true},
		{app, "./test/console/testdata/app", true},
	} {
		if err := goBuild(ctx, b.out, b.pkg, b.static); err != nil {
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
	if err := codePackage(codeZip, dockerfile, map[string]string{"app": app, "bin/sh": busybox, "bin/stty": busybox}); err != nil {
		t.Fatal(err)
	}
	if err := <-npmErr; err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(kernelDir, filepath.Join(data, "kernel")); err != nil {
		t.Fatal(err)
	}
	t.Logf("set-up (npm ci, builds) took %v", time.Since(start).Round(100*time.Millisecond))

	srv := startServer(ctx, t, kiln, data, freePort(t), freePort(t))
	defer srv.stop(t)

	admin, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	adminAccount := accountOf(ctx, t, kiln, data, admin.AccessKeyID)
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
		"KILN_CONSOLE_URL="+srv.apiURL+"/console/",
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

// requirements finds the tools; browsers is console.mjs's KILN_BROWSERS.
func requirements(t *testing.T) (node, npm, browsers, kernelDir string) {
	t.Helper()
	if testenv.Short() {
		t.Skip("-short: the console test needs root, VMs and a browser")
	}
	missing := func(why string) {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI the console test must run, but %s", why)
		}
		t.Skip(why)
	}
	var err error
	if npm, err = exec.LookPath("npm"); err != nil {
		missing("npm is not installed: run `make setup`")
	}
	if node, err = exec.LookPath("node"); err != nil {
		missing("npm without node")
	}
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		missing("chromium is not installed: run `make setup`")
	}
	firefox, err := exec.LookPath("firefox-esr")
	if err != nil {
		missing("firefox-esr is not installed: run `make setup`")
	}
	browsers = "chromium=" + chromium + ",firefox=" + firefox
	// While working on one browser: KILN_CONSOLE_BROWSERS=firefox=/usr/bin/firefox-esr.
	if b := os.Getenv("KILN_CONSOLE_BROWSERS"); b != "" {
		browsers = b
	}
	if os.Geteuid() != 0 {
		missing("the real server needs root (network namespaces)")
	}
	dataDir := os.Getenv("KILN_DATA_DIR")
	if dataDir == "" {
		dataDir = "/var/lib/kiln"
	}
	kernelDir = filepath.Join(dataDir, "kernel")
	if _, err := os.Stat(filepath.Join(kernelDir, "vmlinuz")); err != nil {
		missing("no guest kernel in " + kernelDir + ": run `make setup`")
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing(tool + " not found: run `make setup`")
		}
	}
	return node, npm, browsers, kernelDir
}

func npmInstall(ctx context.Context, npm string) error {
	if _, err := os.Stat(filepath.Join("node_modules", "puppeteer-core")); err == nil {
		return nil
	}
	cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("npm ci: %w\n%s", err, out)
	}
	return nil
}

// goBuild compiles pkg with the flags of `make build` (see test/sdk).
func goBuild(ctx context.Context, out, pkg string, static bool) error {
	args := []string{"build", "-o", out}
	if static {
		args = append(args, "-trimpath", "-ldflags=-s -w")
	}
	cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = os.Environ()
	if static {
		cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// codePackage writes a zip with the Dockerfile and files (name → host
// path), keeping their modes.
func codePackage(path, dockerfile string, files map[string]string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := zip.NewWriter(f)
	w, err := zw.Create("Dockerfile")
	if err != nil {
		return err
	}
	if _, err := io.WriteString(w, dockerfile); err != nil {
		return err
	}
	for name, src := range files {
		fi, err := os.Stat(src)
		if err != nil {
			return err
		}
		h, err := zip.FileInfoHeader(fi)
		if err != nil {
			return err
		}
		h.Name, h.Method = name, zip.Deflate
		w, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}

// accountOf finds a key's account in `kiln keys list`.
func accountOf(ctx context.Context, t *testing.T, kiln, data, keyID string) string {
	t.Helper()
	out, err := exec.CommandContext(ctx, kiln, "--data-dir", data, "keys", "list").Output()
	if err != nil {
		t.Fatalf("kiln keys list: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == keyID {
			return f[1]
		}
	}
	t.Fatalf("key %s not in kiln keys list:\n%s", keyID, out)
	return ""
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

type server struct {
	cmd     *exec.Cmd
	data    string
	log     string
	apiURL  string
	exited  chan struct{}
	waitErr error
}

// startServer runs kiln server on data and waits until its API serves.
func startServer(ctx context.Context, t *testing.T, kiln, data, apiPort, endpointPort string) *server {
	t.Helper()
	s := &server{data: data, log: filepath.Join(filepath.Dir(data), "server.log"), exited: make(chan struct{})}
	logf, err := os.Create(s.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(kiln, "--data-dir", data, "server", "--api-addr", "127.0.0.1:"+apiPort, "--endpoint-addr", "127.0.0.1:"+endpointPort)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	for {
		b, _ := os.ReadFile(s.log)
		if i := bytes.Index(b, []byte(readyLine)); i >= 0 {
			line, _, _ := bytes.Cut(b[i+len(readyLine):], []byte("\n"))
			s.apiURL, _, _ = strings.Cut(strings.TrimSpace(string(line)), " ")
			return s
		}
		select {
		case <-s.exited:
			t.Fatalf("kiln server exited before serving: %v\n%s", s.waitErr, b)
		case <-deadline.C:
			s.stop(t)
			t.Fatalf("kiln server did not serve within 60s")
		case <-ctx.Done():
			s.stop(t)
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop stops the server (SIGTERM) and removes any QEMU or VM network it
// left; after a passing run there must be none (the test terminates its
// microVM through the console).
func (s *server) stop(t *testing.T) {
	t.Helper()
	if s.apiURL != "" {
		if err := s.terminateAll(t); err != nil {
			t.Errorf("terminating the microVMs left over: %v", err)
		}
	}
	select {
	case <-s.exited:
	default:
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(20 * time.Second):
			t.Errorf("kiln server did not stop within 20s of SIGTERM; killing it")
			s.cmd.Process.Kill()
			<-s.exited
		}
	}
	logText, _ := os.ReadFile(s.log)
	t.Logf("kiln server log:\n%s", logText)
	leak := t.Errorf
	if t.Failed() {
		leak = t.Logf
	}
	if pids := qemuOf(s.data); len(pids) > 0 {
		leak("QEMU processes of %s left after the server stopped: %v; killing them", s.data, pids)
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		for end := time.Now().Add(5 * time.Second); len(qemuOf(s.data)) > 0 && time.Now().Before(end); {
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, m := range regexp.MustCompile(`microvm=(\S+) ns=/run/netns/kiln-`).FindAllSubmatch(logText, -1) {
		id := string(m[1])
		if _, err := os.Stat("/run/netns/kiln-" + id); err == nil {
			leak("network of VM %s left behind; removing it", id)
			if err := netns.Teardown(context.Background(), id); err != nil {
				t.Errorf("removing the network of %s: %v", id, err)
			}
		}
	}
}

// terminateAll terminates the microVMs not TERMINATED yet (after a
// failure; a passing run terminated its own) and waits until they are.
func (s *server) terminateAll(t *testing.T) error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	creds, err := auth.ReadCredentials(filepath.Join(s.data, "credentials"), "default")
	if err != nil {
		return err
	}
	c := awscli.NewClient(s.apiURL, "us-east-1", creds)
	list := func() ([]string, error) {
		b, err := c.Do(ctx, "GET", "/"+api.APIVersion+"/microvms", url.Values{"maxResults": {"50"}}, nil)
		if err != nil {
			return nil, err
		}
		var out struct {
			Items []struct{ MicrovmID, State string }
		}
		if err := json.Unmarshal(b, &out); err != nil {
			return nil, fmt.Errorf("decoding ListMicrovms: %w", err)
		}
		var live []string
		for _, m := range out.Items {
			if m.State != "TERMINATED" {
				live = append(live, m.MicrovmID)
			}
		}
		return live, nil
	}
	live, err := list()
	if err != nil || len(live) == 0 {
		return err
	}
	t.Logf("terminating microVMs left over: %v", live)
	for _, id := range live {
		c.Do(ctx, "DELETE", "/"+api.APIVersion+"/microvms/"+id, nil, nil) // a TERMINATING one answers 409
	}
	for len(live) > 0 && ctx.Err() == nil {
		time.Sleep(200 * time.Millisecond)
		if live, err = list(); err != nil {
			return err
		}
	}
	if len(live) > 0 {
		return fmt.Errorf("still not TERMINATED: %v", live)
	}
	return nil
}

func qemuOf(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		args := bytes.Split(b, []byte{0})
		if strings.Contains(filepath.Base(string(args[0])), "qemu") && bytes.Contains(b, []byte(dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}
