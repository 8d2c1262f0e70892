//go:build linux

// Package qemutest gives a test a QEMU driver on the environment vmmtest
// prepared (kernel, agent), on a private data directory.
package qemutest

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// Driver returns a driver on a short private data directory (unix socket
// paths must stay short), or skips the test when env is nil (not set up)
// or it lacks root. Every VM the driver still knows at the end of the
// test fails it, and is terminated.
func Driver(t testing.TB, env *vmmtest.Env, log *slog.Logger) *qemu.Driver {
	t.Helper()
	if env == nil {
		t.Skip("engine not set up (run make setup)")
	}
	testenv.NeedRoot(t, "network namespaces")
	dir := vmmtest.ShortDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := qemu.New(ctx, qemu.Config{DataDir: dir, KernelDir: env.KernelDir, AgentBinary: env.AgentBinary, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vms, _ := d.List(context.Background())
		for _, v := range vms {
			t.Errorf("vm %s left behind", v.ID)
			d.Terminate(context.Background(), v.ID)
		}
		d.Close()
	})
	return d
}
