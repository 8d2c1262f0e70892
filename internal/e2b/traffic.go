package e2b

import (
	"context"
	"sync"

	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Traffic policies of a sandbox's ports (E2B's network.allowPublicTraffic),
// as E2BSandbox.Traffic records them. A sandbox recorded before kiln knew
// them has none: its ports need a kiln endpoint token, as they did.
const (
	TrafficPublic = "public" // E2B's default: no token
	TrafficToken  = "token"  // the sandbox's trafficAccessToken
)

// TrafficGate decides E2B-addressed requests for a sandbox's ports for
// the endpoint proxy (proxy.Envd.Traffic). A sandbox's policy never
// changes, so it is read from the store once and kept (a bounded map);
// a sandbox not recorded yet is not kept, and meanwhile needs a kiln
// token.
type TrafficGate struct {
	Sandboxes store.E2BStore
	Tokens    *EnvdTokens // NewTrafficTokens

	mu     sync.Mutex
	policy map[string]string // by account and sandbox
}

// maxTrafficCache bounds the kept policies; when full, all are dropped.
const maxTrafficCache = 1 << 16

// Decide implements proxy.Envd.Traffic.
func (g *TrafficGate) Decide(ctx context.Context, id, account, tok string) proxy.Traffic {
	key := account + "/" + id
	g.mu.Lock()
	p, ok := g.policy[key]
	g.mu.Unlock()
	if !ok {
		sb, err := g.Sandboxes.GetE2BSandbox(ctx, account, id)
		if err != nil {
			return proxy.TrafficNotE2B
		}
		p = sb.Traffic
		g.mu.Lock()
		if g.policy == nil || len(g.policy) >= maxTrafficCache {
			g.policy = map[string]string{}
		}
		g.policy[key] = p
		g.mu.Unlock()
	}
	switch p {
	case TrafficPublic:
		return proxy.TrafficPublic
	case TrafficToken:
		if tok != "" && g.Tokens.Valid(tok, account, id) {
			return proxy.TrafficToken
		}
		return proxy.TrafficDenied
	}
	return proxy.TrafficNotE2B
}
