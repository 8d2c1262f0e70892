//go:build linux

// Package e2bbench is `kiln bench e2b`: the official E2B SDK (run by
// node) against a real `kiln server` — Sandbox.create to the first output
// of a command, and a commands.run("echo") round trip — next to the AWS
// API's RunMicrovm to the first HTTP 200 of the same image's endpoint,
// measured in the same run on the same server. It drives kiln only from
// outside (a child process, its API and endpoint), like soakbench, whose
// server it reuses.
package e2bbench

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/soakbench"
)

// Options configure the benchmark.
type Options struct {
	Kiln      string // the kiln binary (kiln-agent next to it)
	KernelDir string // guest kernel directory
	Dir       string // parent of the scratch directory ("": the system's temp dir)
	// SDKDir holds node_modules/e2b (test/e2b of the source tree); when
	// it has none, `npm ci` runs there first.
	SDKDir string
	Node   string // node binary ("": PATH)
	Runs   int    // sandboxes (E2B) and microVMs (AWS API) started
	Echoes int    // commands.run("echo") round trips per sandbox
	Keep   bool
	// Progress gets a line per phase.
	Progress io.Writer
}

// Stats are milliseconds over samples.
type Stats struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50Ms"`
	P99 float64 `json:"p99Ms"`
	Min float64 `json:"minMs"`
	Max float64 `json:"maxMs"`
}

func statsOf(ms []float64) Stats {
	if len(ms) == 0 {
		return Stats{}
	}
	s := slices.Clone(ms)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := int(q*float64(len(s))+0.5) - 1
		return round(s[min(max(i, 0), len(s)-1)])
	}
	return Stats{N: len(s), P50: at(0.5), P99: at(0.99), Min: round(s[0]), Max: round(s[len(s)-1])}
}

func round(ms float64) float64 { return float64(int64(ms*10+0.5)) / 10 }

// Result is what the benchmark prints as JSON.
type Result struct {
	Runs int `json:"runs"`
	// SandboxCreateToFirstOutput: Sandbox.create until the first stdout
	// chunk of the sandbox's first commands.run.
	SandboxCreateToFirstOutput Stats `json:"sandboxCreateToFirstOutput"`
	// EchoRoundTrip: commands.run("echo") on a running sandbox.
	EchoRoundTrip Stats `json:"commandsRunEchoRoundTrip"`
	// RunMicrovmToFirstHTTP200: RunMicrovm until the endpoint's first 200.
	RunMicrovmToFirstHTTP200 Stats   `json:"runMicrovmToFirstHttp200"`
	Seconds                  float64 `json:"seconds"`
}

//go:embed bench.mjs
var script []byte

// Run starts a server on a scratch data directory, builds a busybox
// image (with the /bin/bash the SDK runs commands through), then runs
// the SDK's part and the AWS API's part.
func Run(ctx context.Context, o Options) (_ *Result, err error) {
	if o.Runs <= 0 {
		o.Runs = 10
	}
	if o.Echoes <= 0 {
		o.Echoes = 10
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Node == "" {
		if o.Node, err = exec.LookPath("node"); err != nil {
			return nil, fmt.Errorf("no node in PATH (install nodejs, or pass --node): %w", err)
		}
	}
	start := time.Now()
	sdk, err := sdkModules(ctx, o.SDKDir, o.Progress)
	if err != nil {
		return nil, err
	}
	work, data, err := soakbench.ScratchDataDir(o.Dir, "ke2b", o.KernelDir)
	if work != "" && !o.Keep {
		defer os.RemoveAll(work)
	}
	if err != nil {
		return nil, err
	}
	code := filepath.Join(work, "code")
	if err := codeFolder(code); err != nil {
		return nil, err
	}
	srv, err := soakbench.StartServer(ctx, o.Kiln, data, filepath.Join(work, "server.log"))
	if err != nil {
		return nil, err
	}
	defer func() {
		if serr := srv.Stop(); err == nil && serr != nil {
			err = serr
		}
	}()
	creds, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		return nil, err
	}
	c := awscli.NewClient(srv.APIURL(), "us-east-1", creds)
	c.HTTP.Timeout = 30 * time.Second
	fmt.Fprintf(o.Progress, "e2b bench: building the image\n")
	image, err := soakbench.BuildImage(ctx, c, "e2b-bench", code, 10*time.Minute)
	if err != nil {
		return nil, fmt.Errorf("building the bench image: %w\n%s", err, srv.Tail())
	}
	admin, err := srv.AdminAccount()
	if err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, o.Kiln, "--data-dir", data, "keys", "create", "--e2b", "--account", admin).Output()
	if err != nil {
		return nil, fmt.Errorf("kiln keys create --e2b: %w", err)
	}
	var key struct {
		E2BAPIKey string `json:"e2bApiKey"`
	}
	if err := json.Unmarshal(out, &key); err != nil || key.E2BAPIKey == "" {
		return nil, fmt.Errorf("kiln keys create --e2b printed %q: %v", out, err)
	}

	res := &Result{Runs: o.Runs}
	fmt.Fprintf(o.Progress, "e2b bench: %d sandboxes through the SDK, %d echoes each\n", o.Runs, o.Echoes)
	sdkRes, err := runSDK(ctx, o, sdk, work, []string{
		"E2B_API_KEY=" + key.E2BAPIKey,
		"E2B_API_URL=" + srv.APIURL(),
		"E2B_SANDBOX_URL=https://" + srv.EndpointAddr(),
		"E2B_DOMAIN=microvm.localhost",
		"NODE_EXTRA_CA_CERTS=" + filepath.Join(data, "ca.pem"),
		"KILN_TEMPLATE=" + image,
		"KILN_RUNS=" + strconv.Itoa(o.Runs),
		"KILN_ECHOES=" + strconv.Itoa(o.Echoes),
	})
	if err != nil {
		return nil, fmt.Errorf("%w\n%s", err, srv.Tail())
	}
	res.SandboxCreateToFirstOutput = statsOf(sdkRes.CreateToFirstOutput)
	res.EchoRoundTrip = statsOf(sdkRes.Echo)

	fmt.Fprintf(o.Progress, "e2b bench: %d microVMs through RunMicrovm to their first HTTP 200\n", o.Runs)
	hc, err := soakbench.EndpointClient(filepath.Join(data, "ca.pem"), srv.EndpointAddr(), 0)
	if err != nil {
		return nil, err
	}
	var to200 []float64
	for i := 0; i < o.Runs; i++ {
		d, err := runTo200(ctx, c, hc, image)
		if err != nil {
			return nil, fmt.Errorf("RunMicrovm to first HTTP 200, run %d: %w\n%s", i+1, err, srv.Tail())
		}
		to200 = append(to200, float64(d.Microseconds())/1000)
	}
	res.RunMicrovmToFirstHTTP200 = statsOf(to200)
	res.Seconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	return res, nil
}

// codeFolder writes the image's code folder: busybox as /bin/busybox and
// /bin/sh, a /bin/bash handing over to it (the SDK runs commands as
// `/bin/bash -l -c CMD`), busybox httpd serving /index.html on 8080.
func codeFolder(dir string) error {
	bb, err := soakbench.LookBusybox()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		return err
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"bin/busybox", b, 0o755},
		{"bin/bash", []byte("#!/bin/busybox sh\nexec /bin/busybox sh \"$@\"\n"), 0o755},
		{"index.html", []byte("ok\n"), 0o644},
		{"Dockerfile", []byte("FROM scratch\nCOPY bin /bin\nCOPY index.html /index.html\nENV PATH=/bin\n" +
			"CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n"), 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return os.Symlink("busybox", filepath.Join(dir, "bin/sh"))
}

// sdkModules finds node_modules holding the e2b package under dir,
// running `npm ci` there when it has none.
func sdkModules(ctx context.Context, dir string, progress io.Writer) (string, error) {
	if dir == "" {
		dir = filepath.Join("test", "e2b")
	}
	mods, err := filepath.Abs(filepath.Join(dir, "node_modules"))
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(mods, "e2b", "package.json")); err == nil {
		return mods, nil
	}
	if _, err := os.Stat(filepath.Join(dir, "package-lock.json")); err != nil {
		return "", fmt.Errorf("no e2b SDK in %s and no package-lock.json to install it from: pass --sdk-dir (test/e2b of kiln's source tree)", mods)
	}
	fmt.Fprintf(progress, "e2b bench: npm ci in %s\n", dir)
	cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("npm ci in %s: %w\n%s", dir, err, out)
	}
	return mods, nil
}

// sdkResult is what bench.mjs prints: milliseconds.
type sdkResult struct {
	CreateToFirstOutput []float64 `json:"createToFirstOutput"`
	Echo                []float64 `json:"echo"`
}

// runSDK runs bench.mjs beside a link to the SDK's node_modules (node
// resolves packages from the script's folder up).
func runSDK(ctx context.Context, o Options, modules, work string, env []string) (*sdkResult, error) {
	dir := filepath.Join(work, "sdk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.Symlink(modules, filepath.Join(dir, "node_modules")); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "bench.mjs")
	if err := os.WriteFile(path, script, 0o644); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, o.Node, path)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = o.Progress
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("the SDK's part (node bench.mjs): %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var r sdkResult
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		return nil, fmt.Errorf("bench.mjs printed %q: %w", out, err)
	}
	if len(r.CreateToFirstOutput) != o.Runs || len(r.Echo) != o.Runs*o.Echoes {
		return nil, fmt.Errorf("bench.mjs measured %d creates and %d echoes, want %d and %d", len(r.CreateToFirstOutput), len(r.Echo), o.Runs, o.Runs*o.Echoes)
	}
	return &r, nil
}

// runTo200 runs one microVM of the image and times RunMicrovm until its
// endpoint's first 200 (token issued right after the run, as a client
// would), then terminates it and waits until it is gone.
func runTo200(ctx context.Context, c *awscli.Client, hc *http.Client, image string) (time.Duration, error) {
	t0 := time.Now()
	out, err := awscli.Call(ctx, c, awscli.Find("RunMicrovm"), map[string]any{"imageIdentifier": image})
	if err != nil {
		return 0, fmt.Errorf("RunMicrovm: %w", err)
	}
	id, _ := out["microvmId"].(string)
	endpoint, _ := out["endpoint"].(string)
	if id == "" || endpoint == "" {
		return 0, fmt.Errorf("RunMicrovm answered %v", out)
	}
	defer soakbench.Terminate(context.WithoutCancel(ctx), c, id)
	tok, err := awscli.Call(ctx, c, awscli.Find("CreateMicrovmAuthToken"), map[string]any{"microvmIdentifier": id, "expirationInMinutes": 10,
		"allowedPorts": []any{map[string]any{"port": 8080}}})
	if err != nil {
		return 0, fmt.Errorf("CreateMicrovmAuthToken: %w", err)
	}
	hdrs, _ := tok["authToken"].(map[string]any)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		req, err := http.NewRequestWithContext(ctx, "GET", strings.TrimSuffix(endpoint, "/")+"/index.html", nil)
		if err != nil {
			return 0, err
		}
		for k, v := range hdrs {
			s, _ := v.(string)
			req.Header.Set(k, s)
		}
		resp, err := hc.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return time.Since(t0), nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no HTTP 200 from %s within 3 minutes (last: %v)", endpoint, describe(resp, err))
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func describe(resp *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	return resp.Status
}
