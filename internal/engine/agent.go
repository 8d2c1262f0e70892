//go:build linux

package engine

import (
	"context"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// Agent returns the guest agent of a running microVM, for the handlers the
// endpoint proxy serves on the host (the shell, E2B's envd): it refuses a
// VM the engine does not run, so a record alone never reaches a guest.
func (e *Engine) Agent(ctx context.Context, id string) (*client.Client, error) {
	if e.lookup(id) == nil {
		return nil, proxy.ErrNotFound
	}
	return e.cfg.Driver.Agent(ctx, id)
}
