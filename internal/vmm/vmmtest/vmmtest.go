//go:build linux

// Package vmmtest prepares what tests that boot real VMs need: the kernel
// from the set-up step, a freshly built kiln-agent, and a tiny busybox
// root disk. It is shared by every package whose tests run VMs.
package vmmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/busybox"
)

// Env is a prepared test environment.
type Env struct {
	KernelDir   string
	AgentBinary string
	RootDisk    string
	work        string
}

// Setup builds the agent and the root disk. It fails with a message naming
// `make setup` when the kernel or host tools are missing.
func Setup() (*Env, error) {
	e := &Env{KernelDir: filepath.Join(DataDir(), "kernel")}
	if _, err := os.Stat(filepath.Join(e.KernelDir, "vmlinuz")); err != nil {
		return nil, fmt.Errorf("no guest kernel in %s: run `make setup`", e.KernelDir)
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: run `make setup`", tool)
		}
	}
	var err error
	if e.work, err = os.MkdirTemp("", "kiln-vmmtest-"); err != nil {
		return nil, err
	}
	if e.AgentBinary, err = BuildAgent(e.work); err != nil {
		e.Cleanup()
		return nil, err
	}
	if e.RootDisk, err = busybox.Root(e.work); err != nil {
		e.Cleanup()
		return nil, err
	}
	return e, nil
}

// DataDir is where the set-up step put the kernel and managed bases
// ($KILN_DATA_DIR, default /var/lib/kiln); tests share it read-only.
func DataDir() string {
	if d := os.Getenv("KILN_DATA_DIR"); d != "" {
		return d
	}
	return "/var/lib/kiln"
}

// Cleanup removes the environment's files and, once the package's VM
// networks are gone, the host nftables table and forwarding setting they
// needed (netns.RestoreHost does nothing while any is left, so packages
// running at once do not pull it from each other). Safe on nil.
func (e *Env) Cleanup() {
	if e != nil && e.work != "" {
		os.RemoveAll(e.work)
	}
	netns.RemoveHostRules()
}

// BuildAgent compiles cmd/kiln-agent statically into dir.
func BuildAgent(dir string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "kiln-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./cmd/kiln-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building kiln-agent: %v: %s", err, b)
	}
	return out, nil
}

func moduleRoot() (string, error) {
	b, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	mod := strings.TrimSpace(string(b))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the kiln module")
	}
	return filepath.Dir(mod), nil
}

// SetupOrSkip is Setup for a TestMain under the project's rule: in CI
// (CI set) a missing engine fails the run (exit 1); elsewhere it returns
// nil and the VM tests skip themselves.
func SetupOrSkip(pkg string) *Env {
	if testenv.Short() {
		fmt.Fprintf(os.Stderr, "-short: skipping %s VM tests\n", pkg)
		return nil
	}
	e, err := Setup()
	if err == nil {
		return e
	}
	if os.Getenv("CI") != "" {
		fmt.Fprintln(os.Stderr, "engine set-up for tests failed:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "skipping %s VM tests: %v\n", pkg, err)
	return nil
}

// ShortDir is a temporary directory removed after the test, short enough
// for the unix sockets under it (paths stay under 108 bytes; t.TempDir
// can be long).
func ShortDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "kt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
