//go:build linux

// Package kilntest holds what the end-to-end tests under test/ share: the
// checks that skip outside CI (and fail in it) when the host lacks what a
// real `kiln server` needs, building the binaries with `make build`'s
// flags, code packages, and a `kiln server` subprocess that, when stopped,
// terminates what is left and proves no QEMU or VM network outlived it.
package kilntest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// ReadyLine is what `kiln server` prints once the API serves.
const ReadyLine = "kiln API serving at "

// Host is what a test found on the host.
type Host struct {
	Node, Npm string
	// KernelDir is the guest kernel's directory ($KILN_DATA_DIR/kernel).
	KernelDir string
	// Tools maps each extra tool asked for to its path.
	Tools map[string]string
}

// Requirements returns node, npm, the guest kernel and the extra tools,
// or skips the test (fails it when CI is set) naming what is missing;
// suite names the test in that message.
func Requirements(t *testing.T, suite string, tools ...string) Host {
	t.Helper()
	if testenv.Short() {
		t.Skipf("-short: the %s test needs root, VMs and node", suite)
	}
	missing := func(why string) {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI the %s test must run, but %s", suite, why)
		}
		t.Skip(why)
	}
	h := Host{Tools: map[string]string{}}
	var err error
	if h.Npm, err = exec.LookPath("npm"); err != nil {
		missing("npm is not installed: run `make setup`")
	}
	if h.Node, err = exec.LookPath("node"); err != nil {
		missing("npm without node")
	}
	if os.Geteuid() != 0 {
		missing("the real server needs root (network namespaces)")
	}
	dataDir := os.Getenv("KILN_DATA_DIR")
	if dataDir == "" {
		dataDir = "/var/lib/kiln"
	}
	h.KernelDir = filepath.Join(dataDir, "kernel")
	if _, err := os.Stat(filepath.Join(h.KernelDir, "vmlinuz")); err != nil {
		missing("no guest kernel in " + h.KernelDir + ": run `make setup`")
	}
	for _, tool := range append([]string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4"}, tools...) {
		p, err := exec.LookPath(tool)
		if err != nil {
			missing(tool + " not found: run `make setup`")
		}
		h.Tools[tool] = p
	}
	return h
}

// NpmInstall runs `npm ci` in dir unless node_modules/marker exists.
// Test packages run in parallel and two may share dir (test/e2b's
// scripts): npm ci first deletes node_modules, so one at a time, under
// a lock in dir.
func NpmInstall(ctx context.Context, npm, dir, marker string) error {
	lock, err := os.OpenFile(filepath.Join(dir, ".npm-install.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", marker)); err == nil {
		return nil
	}
	cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("npm ci: %w\n%s", err, out)
	}
	return nil
}

// GoBuild compiles pkg (relative to the module root, two levels up from a
// test's directory) to out, with the flags of `make build` so that after
// it (as in `make test`) the build cache has everything: kiln as is,
// static binaries trimmed and stripped.
func GoBuild(ctx context.Context, out, pkg string, static bool) error {
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

// WorkDir makes a scratch directory with bin/ and d/ (the data directory).
// Unix socket paths under the data directory must stay short, so it is
// under the system's temporary directory, not t.TempDir.
func WorkDir(t *testing.T, prefix string) (work, bin, data string) {
	t.Helper()
	work, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	bin, data = filepath.Join(work, "bin"), filepath.Join(work, "d")
	for _, d := range []string{bin, data} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return work, bin, data
}

// CodePackage writes a zip with the Dockerfile and files (name → host
// path), keeping their modes.
func CodePackage(path, dockerfile string, files map[string]string) error {
	return awscli.WriteCodePackage(path, dockerfile, files)
}

// FileURI is the file:// URI of a host path.
func FileURI(p string) string { return (&url.URL{Scheme: "file", Path: p}).String() }

// FreePort returns a TCP port free on 127.0.0.1 just now.
func FreePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// AccountOf finds a key's account in `kiln keys list`.
func AccountOf(ctx context.Context, t *testing.T, kiln, data, keyID string) string {
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

// Server is a `kiln server` subprocess.
type Server struct {
	cmd          *exec.Cmd
	Data, Log    string
	APIURL       string
	EndpointAddr string
	exited       chan struct{}
	waitErr      error
}

// StartServer runs kiln server on data and waits until its API serves.
// Its output goes to a file (not a pipe: nothing it starts may hold our
// end open) and into the test log at Stop.
func StartServer(ctx context.Context, t *testing.T, kiln, data, apiPort, endpointPort string, env []string, args ...string) *Server {
	t.Helper()
	s := &Server{Data: data, Log: filepath.Join(filepath.Dir(data), "server.log"), exited: make(chan struct{}),
		EndpointAddr: "127.0.0.1:" + endpointPort}
	logf, err := os.Create(s.Log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(kiln, append([]string{"--data-dir", data, "server", "--api-addr", "127.0.0.1:" + apiPort, "--endpoint-addr", s.EndpointAddr,
		// A port of its own: the default 9091 may be taken on a test host.
		"--metrics-addr", "127.0.0.1:0"}, args...)...)
	s.cmd.Env = append(os.Environ(), env...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	for {
		b, _ := os.ReadFile(s.Log)
		if i := bytes.Index(b, []byte(ReadyLine)); i >= 0 {
			// "URL (accel ...)": the URL is the first field.
			line, _, _ := bytes.Cut(b[i+len(ReadyLine):], []byte("\n"))
			s.APIURL, _, _ = strings.Cut(strings.TrimSpace(string(line)), " ")
			return s
		}
		select {
		case <-s.exited:
			t.Fatalf("kiln server exited before serving: %v\n%s", s.waitErr, b)
		case <-deadline.C:
			s.Stop(t)
			t.Fatalf("kiln server did not serve within 60s")
		case <-ctx.Done():
			s.Stop(t)
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// AdminAccount is the account of the admin key the server created on
// first start (from its log).
func (s *Server) AdminAccount(t *testing.T) string {
	t.Helper()
	b, _ := os.ReadFile(s.Log)
	m := regexp.MustCompile(`created admin access key .*account=(\d{12})`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no admin account in the server log:\n%s", b)
	}
	return string(m[1])
}

// Stop terminates every microVM the API still knows, stops the server,
// and checks that no QEMU of its data directory and no network namespace
// of its VMs remain (removing them if they do).
func (s *Server) Stop(t *testing.T) {
	t.Helper()
	if s.APIURL != "" {
		if err := s.TerminateAll(t); err != nil {
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
	logText, _ := os.ReadFile(s.Log)
	t.Logf("kiln server log:\n%s", logText)
	// After a passing run nothing may remain. After a failure the server
	// may have left VMs running on purpose (a restarted server adopts
	// them; a build cut short by the shutdown runs again): remove them.
	leak := t.Errorf
	if t.Failed() {
		leak = t.Logf
	}
	if pids := QemuOf(s.Data); len(pids) > 0 {
		leak("QEMU processes of %s left after the server stopped: %v; killing them", s.Data, pids)
		KillQemuOf(t, s.Data)
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

// TerminateAll terminates the admin account's microVMs that are not
// TERMINATED yet and waits until they are: after a passing test there are
// none.
func (s *Server) TerminateAll(t *testing.T) error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	creds, err := auth.ReadCredentials(filepath.Join(s.Data, "credentials"), "default")
	if err != nil {
		return err
	}
	c := awscli.NewClient(s.APIURL, "us-east-1", creds)
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

// KillQemuOf kills the QEMU processes of the data dir dir, as the loss
// of the host they ran on would, and removes the kiln cgroups they were
// in: nothing owns those any more (a restarted node's driver removes its
// own strays, but a stand-in host killed for good never restarts).
func KillQemuOf(t *testing.T, dir string) {
	t.Helper()
	pids := QemuOf(dir)
	var groups []string
	for _, pid := range pids {
		groups = append(groups, kilnCgroups(pid)...)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for end := time.Now().Add(5 * time.Second); len(QemuOf(dir)) > 0 && time.Now().Before(end); {
		time.Sleep(50 * time.Millisecond)
	}
	for _, g := range groups {
		if err := jail.RemoveCgroup(g); err != nil {
			t.Errorf("removing the cgroup of a killed QEMU: %v", err)
		}
	}
}

// kilnCgroups names the cgroups under kiln/ that pid is in, each once.
func kilnCgroups(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil
	}
	seen := map[string]bool{}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		// hierarchy-ID:controllers:/path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		name := strings.TrimPrefix(parts[2], "/")
		if strings.HasPrefix(name, "kiln/") && !seen[name] {
			seen[name] = true
			out = append(out, name)
		}
	}
	return out
}

// QemuOf lists the QEMU processes of the data dir dir: named on their
// command line, or (jailed) the source of their root mount.
func QemuOf(dir string) []int {
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
		// A jailed QEMU's command line names only jail paths; its mount
		// table still shows which data dir its root came from.
		mi, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "mountinfo"))
		if bytes.Contains(b, []byte(dir+"/")) || bytes.Contains(mi, []byte(dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}
