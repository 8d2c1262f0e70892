//go:build linux

// Package sdk runs e2e.mjs, an end-to-end test of kiln's API with the
// official AWS SDK for JavaScript v3, against a real `kiln server`: the
// binaries built from this tree, real microVMs (QEMU, TCG on hosts without
// a usable KVM), their networks and the HTTPS endpoint proxy. Outside CI it
// skips when npm, root or the engine's set-up (`make setup`) is missing;
// in CI it fails instead.
package sdk

import (
	"archive/zip"
	"bytes"
	"context"
	"encoding/json"
	"errors"
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

// readyLine is what `kiln server` prints once the API serves.
const readyLine = "kiln API serving at "

func TestJavaScriptSDK(t *testing.T) {
	node, npm, kernelDir := requirements(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()

	// npm ci (network) runs while the binaries compile (CPU).
	npmErr := make(chan error, 1)
	go func() { npmErr <- npmInstall(ctx, npm) }()

	// Unix socket paths under the data directory must stay short: no
	// t.TempDir here.
	work, err := os.MkdirTemp("", "ksdk")
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
		if err := goBuild(ctx, b.out, b.pkg, b.static); err != nil {
			t.Fatal(err)
		}
	}
	code1, code2 := filepath.Join(work, "app-v1.zip"), filepath.Join(work, "app-v2.zip")
	for i, zp := range []string{code1, code2} {
		if err := codePackage(zp, app, fmt.Sprintf("FROM scratch\nCOPY app /app\nENV VERSION=%d\nCMD [\"/app\"]\n", i+1)); err != nil {
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
	srv := startServer(ctx, t, kiln, data, freePort(t), freePort(t),
		append(s3srv.Env(), "AWS_SHARED_CREDENTIALS_FILE="+roleCreds, "AWS_CONFIG_FILE="+filepath.Join(work, "no-config")),
		"--s3-endpoint", s3srv.Endpoint, "--roles-file", rolesFile)
	defer srv.stop(t)
	roleARN := "arn:aws:iam::" + srv.adminAccount(t) + ":role/kiln-vm-role"
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

	t.Logf("running e2e.mjs against %s (endpoints on %s)", srv.apiURL, srv.endpointAddr)
	scriptStart := time.Now()
	cmd := exec.CommandContext(ctx, node, "e2e.mjs")
	cmd.Env = append(os.Environ(),
		"AWS_ENDPOINT_URL="+srv.apiURL,
		"AWS_SHARED_CREDENTIALS_FILE="+filepath.Join(data, "credentials"),
		"AWS_CONFIG_FILE="+filepath.Join(work, "no-config"),
		"AWS_REGION=us-east-1",
		"AWS_PROFILE=default",
		"AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "AWS_SESSION_TOKEN=",
		"AWS_EC2_METADATA_DISABLED=true",
		"KILN_CODE_URI="+s3URI,
		"KILN_HOST_CODE_URI="+fileURI(code1),
		"KILN_ROLE_ARN="+roleARN,
		"KILN_IMDS_OUT="+imdsOut,
		"KILN_CODE_URI_2="+fileURI(code2),
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

// adminAccount is the account of the admin key the server created on
// first start (from its log).
func (s *server) adminAccount(t *testing.T) string {
	t.Helper()
	b, _ := os.ReadFile(s.log)
	m := regexp.MustCompile(`created admin access key .*account=(\d{12})`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no admin account in the server log:\n%s", b)
	}
	return string(m[1])
}

// requirements returns node, npm and the guest kernel's directory, or
// skips (fails in CI) when something is missing.
func requirements(t *testing.T) (node, npm, kernelDir string) {
	t.Helper()
	if testenv.Short() {
		t.Skip("-short: the SDK test needs root, VMs and node")
	}
	missing := func(why string) {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI the SDK test must run, but %s", why)
		}
		t.Skip(why)
	}
	var err error
	if npm, err = exec.LookPath("npm"); err != nil {
		missing("npm is not installed")
	}
	if node, err = exec.LookPath("node"); err != nil {
		missing("npm without node")
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
	return node, npm, kernelDir
}

func npmInstall(ctx context.Context, npm string) error {
	if _, err := os.Stat(filepath.Join("node_modules", "@aws-sdk", "client-lambda-microvms")); err == nil {
		return nil
	}
	cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("npm ci: %w\n%s", err, out)
	}
	return nil
}

// goBuild compiles pkg (relative to the module root) to out, with the
// flags of `make build` so that after it (as in `make test`) the build
// cache has everything: kiln as is, static binaries trimmed and stripped.
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

// codePackage writes a zip holding dockerfile and the app binary.
func codePackage(path, app, dockerfile string) error {
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
	fi, err := os.Stat(app)
	if err != nil {
		return err
	}
	h, err := zip.FileInfoHeader(fi) // keeps the executable bit
	if err != nil {
		return err
	}
	h.Name, h.Method = "app", zip.Deflate
	if w, err = zw.CreateHeader(h); err != nil {
		return err
	}
	b, err := os.Open(app)
	if err != nil {
		return err
	}
	defer b.Close()
	if _, err := io.Copy(w, b); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func fileURI(p string) string { return (&url.URL{Scheme: "file", Path: p}).String() }

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// server is a `kiln server` subprocess.
type server struct {
	cmd          *exec.Cmd
	data, log    string
	apiURL       string
	endpointAddr string
	exited       chan struct{}
	waitErr      error
}

// startServer runs kiln server on data and waits until its API serves.
// Its output goes to a file (not a pipe: nothing it starts may hold our
// end open) and into the test log at the end.
func startServer(ctx context.Context, t *testing.T, kiln, data, apiPort, endpointPort string, env []string, args ...string) *server {
	t.Helper()
	s := &server{data: data, log: filepath.Join(filepath.Dir(data), "server.log"), exited: make(chan struct{}),
		endpointAddr: "127.0.0.1:" + endpointPort}
	logf, err := os.Create(s.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(kiln, append([]string{"--data-dir", data, "server", "--api-addr", "127.0.0.1:" + apiPort, "--endpoint-addr", s.endpointAddr}, args...)...)
	s.cmd.Env = append(os.Environ(), env...)
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
			// "URL (accel ...)": the URL is the first field.
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

// stop terminates every microVM the API still knows, stops the server,
// and checks that no QEMU of its data directory and no network namespace
// of its VMs remain (removing them if they do).
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
	// After a passing run nothing may remain. After a failure the server
	// may have left VMs running on purpose (a restarted server adopts
	// them; a build cut short by the shutdown runs again): remove them.
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
	// The server logs each VM network it makes; none may outlive it.
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

// terminateAll terminates the microVMs that are not TERMINATED yet and
// waits until they are: after a successful e2e.mjs there are none.
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
	var errs []error
	for _, id := range live {
		if _, err := c.Do(ctx, "DELETE", "/"+api.APIVersion+"/microvms/"+id, nil, nil); err != nil {
			var ae *awscli.APIError
			if !errors.As(err, &ae) || ae.Type != "ConflictException" { // already TERMINATING
				errs = append(errs, err)
			}
		}
	}
	for len(live) > 0 && ctx.Err() == nil {
		time.Sleep(200 * time.Millisecond)
		if live, err = list(); err != nil {
			return errors.Join(append(errs, err)...)
		}
	}
	if len(live) > 0 {
		errs = append(errs, fmt.Errorf("still not TERMINATED: %v", live))
	}
	return errors.Join(errs...)
}

// qemuOf lists the QEMU processes whose command line names dir.
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
		if !strings.Contains(filepath.Base(string(args[0])), "qemu") {
			continue
		}
		if bytes.Contains(b, []byte(dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

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
	if err := npmInstall(ctx, npm); err != nil {
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
