package e2b

import (
	"context"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// TestTrafficGate: public sandboxes pass, private ones with their traffic
// token only (never the envd token, nor another sandbox's), and anything
// that is no E2B sandbox with a policy falls back to kiln's tokens.
func TestTrafficGate(t *testing.T) {
	e := newEnv(t)
	e.srv.cfg.TrafficTokens = NewTrafficTokens([]byte("k"))
	ctx := context.Background()
	pub := e.create(map[string]any{"templateID": "tmpl"})
	a := e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "network": map[string]any{"allowPublicTraffic": false}})
	e.want(a, 201, "create a private sandbox")
	var priv sandboxOut
	a.json(t, &priv)
	if priv.TrafficAccessToken == "" || priv.TrafficAccessToken == priv.EnvdAccessToken {
		t.Fatalf("private sandbox's tokens: %+v", priv)
	}
	legacy := "mvm-0123456789abcdef0123"
	if err := e.st.PutE2BSandbox(ctx, store.E2BSandbox{ID: legacy, Account: e.account, TemplateID: "tmpl", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	g := &TrafficGate{Sandboxes: e.st, Tokens: NewTrafficTokens([]byte("k"))}
	other := e.srv.cfg.TrafficTokens.Mint(e.account, pub)
	for _, tc := range []struct {
		name, id, account, tok string
		want                   proxy.Traffic
	}{
		{"public", pub, e.account, "", proxy.TrafficPublic},
		{"private with its token", priv.SandboxID, e.account, priv.TrafficAccessToken, proxy.TrafficToken},
		{"private, no token", priv.SandboxID, e.account, "", proxy.TrafficDenied},
		{"private, envd token", priv.SandboxID, e.account, priv.EnvdAccessToken, proxy.TrafficDenied},
		{"private, another sandbox's token", priv.SandboxID, e.account, other, proxy.TrafficDenied},
		{"another account", pub, "999999999999", "", proxy.TrafficNotE2B},
		{"no E2B record", "mvm-ffff", e.account, "", proxy.TrafficNotE2B},
		{"recorded before traffic policies", legacy, e.account, "", proxy.TrafficNotE2B},
		{"public, kept", pub, e.account, "", proxy.TrafficPublic},
	} {
		if got := g.Decide(ctx, tc.id, tc.account, tc.tok); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
