//go:build linux

package qemu

import (
	"testing"

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
		New:      func(t *testing.T) vmm.Driver { return newDriver(t, shortDir(t)) },
		RootDisk: env.RootDisk,
	})
}
