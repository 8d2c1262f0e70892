//go:build linux

package qemu

import (
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/drivertest"
)

// TestDriverConformance runs the vmm.Driver conformance suite against
// the QEMU driver with real VMs (two boots, one clone).
func TestDriverConformance(t *testing.T) {
	if env == nil {
		t.Skip("engine not set up (run make setup)")
	}
	drivertest.Run(t, drivertest.Config{
		New: func(t *testing.T) vmm.Driver {
			d := newDriver(t, shortDir(t))
			// CI's TCG on a shared, loaded machine: a boot took 51 s here
			// with the load average at 20.
			d.cfg.BootTimeout = 3 * time.Minute
			return d
		},
		RootDisk: env.RootDisk,
	})
}
