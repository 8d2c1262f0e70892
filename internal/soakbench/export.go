//go:build linux

package soakbench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// Server is the soak's `kiln server` child, for other benches that drive
// a real server from outside (e2bbench).
type Server struct{ s *server }

// StartServer runs `kiln server` on data (log to logFile) on free
// loopback ports and waits until its API serves.
func StartServer(ctx context.Context, kiln, data, logFile string) (*Server, error) {
	s := &server{kiln: kiln, data: data, log: logFile, api: freeAddr(), endpoint: freeAddr(), metrics: freeAddr(), progress: io.Discard}
	if err := s.start(ctx); err != nil {
		return nil, err
	}
	return &Server{s: s}, nil
}

// APIURL is the server's API (http://127.0.0.1:PORT).
func (s *Server) APIURL() string { return s.s.url() }

// EndpointAddr is the endpoint proxy's address (127.0.0.1:PORT).
func (s *Server) EndpointAddr() string { return s.s.endpoint }

// Stop stops the server (SIGTERM, then SIGKILL after a minute).
func (s *Server) Stop() error { return s.s.stop() }

// Tail is the end of the server's log, for error messages.
func (s *Server) Tail() string { return s.s.tail() }

// AdminAccount is the account of the admin key the server made on its
// first start (from its log).
func (s *Server) AdminAccount() (string, error) {
	b, _ := os.ReadFile(s.s.log)
	m := regexp.MustCompile(`created admin access key .*account=(\d{12})`).FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("no admin account in the server log")
	}
	return string(m[1]), nil
}

// BuildImage builds an image from code (a zip or folder) through the API
// as the soak builds its image: named base-1, or base-2 and base-3 when a
// build VM's boot timed out on a loaded host; it returns the name built.
func BuildImage(ctx context.Context, c *awscli.Client, base, code string, timeout time.Duration) (string, error) {
	cl := &client{c: c}
	if err := cl.createImage(ctx, base, code, timeout); err != nil {
		return "", err
	}
	return cl.image, nil
}

// LookBusybox finds the host's static busybox.
func LookBusybox() (string, error) { return lookBusybox() }

// ScratchDataDir makes a scratch folder (under dir, "" for the system's
// temp dir; named prefix*) holding a data directory "d" with the guest
// kernel linked in. The caller removes work.
func ScratchDataDir(dir, prefix, kernelDir string) (work, data string, err error) {
	// Unix socket paths under the data directory must stay short.
	work, err = os.MkdirTemp(dir, prefix)
	if err != nil {
		return "", "", fmt.Errorf("making the scratch directory: %w", err)
	}
	// The data directory is named by its absolute path everywhere (the
	// cgroup hash, QEMU command lines, mounts).
	if work, err = filepath.Abs(work); err != nil {
		return "", "", err
	}
	data = filepath.Join(work, "d")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return work, "", err
	}
	if err := os.Symlink(kernelDir, filepath.Join(data, "kernel")); err != nil {
		return work, "", fmt.Errorf("linking the kernel: %w", err)
	}
	return work, data, nil
}

// VMIDsIn returns the VM ids (microVMs, build VMs) named in a kiln log.
func VMIDsIn(log []byte) []string { return vmIDsIn(log) }

// HostLeftovers counts what the VMs of data (ids, and any its vms and net
// folders name) left on the host: QEMU processes, network namespaces,
// links, TAP devices, nftables tables, cgroups, mounts, and VM files; the
// image versions it built are not counted.
func HostLeftovers(ctx context.Context, data string, ids []string) Leaks {
	images := map[string]bool{}
	vers, _ := filepath.Glob(filepath.Join(data, "images", "*", "*", "*"))
	for _, v := range vers {
		images[v] = true
	}
	return countLeaks(ctx, data, ids, images)
}

// ForceRemove kills the QEMUs of data and removes its VMs' networks
// (ids) and cgroups: the clean-up of a run cut short.
func ForceRemove(data string, ids []string, progress io.Writer) { removeAll(data, ids, progress) }
