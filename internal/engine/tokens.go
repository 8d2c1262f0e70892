//go:build linux

package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// TokenIssuer makes CreateMicrovmAuthToken and CreateMicrovmShellAuthToken
// tokens with the same internal/token Signer the endpoint proxy checks.
type TokenIssuer struct {
	Signer *token.Signer
	Now    func() time.Time
}

// IssueToken implements api.TokenIssuer. The API's authToken is a map of
// header to value; clients send it as is.
func (t *TokenIssuer) IssueToken(ctx context.Context, m store.Microvm, req api.TokenRequest) (map[string]string, error) {
	now := time.Now
	if t.Now != nil {
		now = t.Now
	}
	ttl := req.Expires.Sub(now()).Round(time.Second)
	if ttl > token.MaxTTL {
		ttl = token.MaxTTL
	}
	kind := token.KindEndpoint
	ports, err := portRanges(req.Ports)
	if err != nil {
		return nil, err
	}
	if req.Shell {
		kind = token.KindShell
		ports = []token.PortRange{token.Port(proxy.ShellPort)}
	}
	tok, _, err := t.Signer.Mint(m.Account, m.ID, kind, ports, ttl)
	if err != nil {
		return nil, fmt.Errorf("minting token: %w", err)
	}
	return map[string]string{proxy.HeaderAuth: tok}, nil
}

func portRanges(specs []api.PortSpec) ([]token.PortRange, error) {
	var out []token.PortRange
	for _, p := range specs {
		switch {
		case p.AllPorts != nil:
			out = append(out, token.AllPorts)
		case p.Port != nil:
			out = append(out, token.Port(uint16(*p.Port)))
		case p.Range != nil && p.Range.StartPort != nil && p.Range.EndPort != nil:
			out = append(out, token.PortRange{From: uint16(*p.Range.StartPort), To: uint16(*p.Range.EndPort)})
		default:
			return nil, fmt.Errorf("empty port specification: %w", token.ErrInvalid)
		}
	}
	return out, nil
}
