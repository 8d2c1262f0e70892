//go:build linux

package busybox

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// AppTemplate makes a template of an HTTP app under dir (for the engine's
// tests and its endpoint benchmark): it boots rootDisk (a root with
// busybox, such as Root makes) with
// a network, starts an HTTP app on port 8080 and snapshots the VM with
// the app listening. app is a static binary to copy in and run as
// /opt/app; "" runs busybox httpd serving "ok" at /. The build VM and its
// network are removed before it returns.
func AppTemplate(ctx context.Context, drv vmm.Driver, rootDisk, app, dir string) (string, error) {
	id := fmt.Sprintf("kb-tmpl-%d", os.Getpid())
	g, err := guestvm.Boot(ctx, guestvm.Config{ID: id, Driver: drv}, vmm.BootSpec{RootDisk: rootDisk, MemoryMiB: 256})
	if err != nil {
		return "", fmt.Errorf("template vm: %w", err)
	}
	defer g.Close()
	a, err := drv.Agent(ctx, id)
	if err != nil {
		return "", err
	}
	argv := []string{"/bin/sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec /bin/busybox httpd -f -p 8080 -h /www"}
	if app != "" {
		b, err := os.ReadFile(app)
		if err != nil {
			return "", err
		}
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		tw.WriteHeader(&tar.Header{Name: "app", Mode: 0o755, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
		tw.Close()
		if err := a.CopyIn(ctx, "/opt", &tb); err != nil {
			return "", fmt.Errorf("copying the app in: %w", err)
		}
		argv = []string{"/opt/app"}
	}
	if _, err := a.Exec(ctx, client.ExecRequest{Argv: argv, Background: true}); err != nil {
		return "", fmt.Errorf("starting the app: %w", err)
	}
	if err := a.WaitPort(ctx, 8080, 30*time.Second); err != nil {
		return "", fmt.Errorf("waiting for the app: %w", err)
	}
	tmpl := filepath.Join(dir, "bench-template")
	if _, err := drv.Snapshot(ctx, id, tmpl); err != nil {
		return "", err
	}
	return tmpl, nil
}
