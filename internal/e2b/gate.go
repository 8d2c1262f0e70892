package e2b

import (
	"net/http"
	"time"

	"github.com/kiln-sandbox/kiln/internal/e2b/envd"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// EndpointGate is what the endpoint proxy checks for E2B (envd's token or
// signed URL, the sandboxes' traffic policy), under keys derived from the
// token key serverKey. `kiln server` sets its Handler to envd on the host;
// a cluster's edge leaves it nil, so that a checked envd request goes on
// through the tunnel to the node that runs the sandbox.
func EndpointGate(serverKey []byte, sandboxes store.E2BStore) *proxy.Envd {
	tokens := NewEnvdTokens(serverKey)
	return &proxy.Envd{Port: EnvdPort,
		Authorize: func(tok, id, account string) bool { return tokens.Valid(tok, account, id) },
		Signed: func(r *http.Request, id, account string) error {
			return envd.CheckSignature(r, tokens.Mint(account, id), time.Now())
		},
		Traffic: (&TrafficGate{Sandboxes: sandboxes, Tokens: NewTrafficTokens(serverKey)}).Decide}
}
