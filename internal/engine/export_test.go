//go:build linux

package engine

import (
	"time"

	"github.com/kiln-sandbox/kiln/internal/guestvm"
)

// What the end-to-end tests (package engine_test, which run the server
// internal/server assembles) read and set of the engine's internals.

// Guest is microVM id's VM with its network (nil if it has none) and
// whether the engine tracks id at all.
func (e *Engine) Guest(id string) (*guestvm.VM, bool) {
	v := e.lookup(id)
	if v == nil {
		return nil, false
	}
	return v.guest(), true
}

// SetBuildTimeout changes the whole-build deadline of builds started
// from now on (it is read when a build starts).
func (e *Engine) SetBuildTimeout(d time.Duration) { e.cfg.BuildTimeout = d }

// BuildsInFlight is how many builds are queued or running.
func (e *Engine) BuildsInFlight() int {
	e.buildMu.Lock()
	defer e.buildMu.Unlock()
	return len(e.builds)
}

// BuildCommittedMiB is the host memory build id holds.
func (e *Engine) BuildCommittedMiB(id string) int64 {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	return e.committed["build/"+id]
}

// MarkNet records that this data directory made id's network.
func (e *Engine) MarkNet(id string) error { return e.markNet(id, true) }

// WaitBuilds waits until every build started has ended.
func (e *Engine) WaitBuilds() { e.buildWG.Wait() }
