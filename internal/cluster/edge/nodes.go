package edge

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Nodes is the Waker and ActivityReporter of `kiln edge`: the nodes'
// gRPC service (noderpc), called with the edge's certificate.
type Nodes struct {
	Clients *noderpc.Clients
}

var (
	_ Waker            = Nodes{}
	_ ActivityReporter = Nodes{}
)

// EnsureRunning asks the node to wake the microVM, and turns the
// node's answer back into the proxy's.
func (n Nodes) EnsureRunning(ctx context.Context, node store.Node, id string) error {
	c, err := n.Clients.Get(node)
	if err != nil {
		return err
	}
	err = c.EnsureRunning(ctx, id)
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, errdefs.ErrNotFound):
		return fmt.Errorf("%w (%v)", proxy.ErrNotFound, err)
	case errors.Is(err, errdefs.ErrConflict):
		return fmt.Errorf("%w (%v)", proxy.ErrSuspended, err)
	case errors.Is(err, errdefs.ErrExhausted):
		return err
	}
	return fmt.Errorf("%w (%v)", proxy.ErrUnavailable, err)
}

// Activity reports the edge's traffic to the node.
func (n Nodes) Activity(ctx context.Context, node store.Node, seen map[string]time.Time) error {
	c, err := n.Clients.Get(node)
	if err != nil {
		return err
	}
	return c.Activity(ctx, seen)
}
