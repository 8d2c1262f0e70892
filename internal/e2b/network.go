package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Policer applies a sandbox's egress rules to its VM's network (the
// engine: nftables in the VM's namespace).
type Policer interface {
	SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy) error
}

// networkIn is what E2B's SandboxNetworkConfig (create) and
// SandboxNetworkUpdateConfig (PUT /sandboxes/{id}/network) carry. Fields
// kiln cannot honour are decoded so that asking for them is refused.
type networkIn struct {
	AllowOut            []string        `json:"allowOut"`
	DenyOut             []string        `json:"denyOut"`
	AllowInternetAccess *bool           `json:"allow_internet_access"` // update only
	AllowPublicTraffic  *bool           `json:"allowPublicTraffic"`    // create only
	MaskRequestHost     *string         `json:"maskRequestHost"`       // create only
	EgressProxy         json.RawMessage `json:"egressProxy"`
	Rules               json.RawMessage `json:"rules"`
	HTTPSPorts          json.RawMessage `json:"httpsPorts"`
}

// parseNetwork checks the egress rules: allowOut and denyOut entries are
// IPv4 CIDR blocks or addresses. The rest is refused with what to do.
func parseNetwork(in networkIn) (netns.EgressPolicy, error) {
	var p netns.EgressPolicy
	switch {
	case set(in.EgressProxy):
		return p, errorf(400, "network.egressProxy is not supported by kiln")
	case set(in.Rules):
		return p, errorf(400, "network.rules (request transforms) are not supported by kiln")
	case set(in.HTTPSPorts):
		return p, errorf(400, "network.httpsPorts is not supported by kiln")
	case in.MaskRequestHost != nil:
		return p, errorf(400, "network.maskRequestHost is not supported by kiln")
	}
	if n := len(in.AllowOut) + len(in.DenyOut); n > netns.MaxPolicyPrefixes {
		return p, errorf(400, "network has %d allowOut and denyOut entries; at most %d", n, netns.MaxPolicyPrefixes)
	}
	var err error
	if p.Allow, err = parsePrefixes("allowOut", in.AllowOut); err != nil {
		return p, err
	}
	if p.Deny, err = parsePrefixes("denyOut", in.DenyOut); err != nil {
		return p, err
	}
	if in.AllowInternetAccess != nil && !*in.AllowInternetAccess {
		// E2B: the same as denying 0.0.0.0/0 (allowOut still wins).
		p.Deny = append(p.Deny, netip.MustParsePrefix("0.0.0.0/0"))
	}
	return p, nil
}

// parsePrefixes reads IPv4 CIDR blocks ("8.8.8.0/24") and addresses
// ("8.8.8.8", a /32).
func parsePrefixes(field string, entries []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(entries))
	for _, e := range entries {
		if len(e) > 64 {
			return nil, errorf(400, "network.%s entry %.64q... is too long: give an IPv4 CIDR block or address", field, e)
		}
		var p netip.Prefix
		var err error
		if strings.Contains(e, "/") {
			p, err = netip.ParsePrefix(e)
		} else {
			var a netip.Addr
			if a, err = netip.ParseAddr(e); err == nil {
				p = netip.PrefixFrom(a, a.BitLen())
			}
		}
		switch {
		case err != nil && looksLikeDomain(e):
			return nil, errorf(400, "network.%s entry %q: kiln does not filter by domain name yet: give IPv4 CIDR blocks or addresses", field, e)
		case err != nil:
			return nil, errorf(400, "network.%s entry %q is not an IPv4 CIDR block (like 8.8.8.0/24) or address (like 8.8.8.8)", field, e)
		case !p.Addr().Is4():
			return nil, errorf(400, "network.%s entry %q is IPv6: no IPv6 leaves a kiln sandbox, give IPv4 blocks", field, e)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// looksLikeDomain tells a name apart from a malformed address, for the
// error message only.
func looksLikeDomain(s string) bool {
	s = strings.TrimPrefix(s, "*.")
	if s == "" || !strings.Contains(s, ".") {
		return false
	}
	for _, c := range s {
		if !(c == '-' || c == '.' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return strings.IndexFunc(s, func(c rune) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }) >= 0
}

// networkOut is E2B's SandboxNetworkConfig as getInfo shows it.
type networkOut struct {
	AllowOut           []string `json:"allowOut,omitempty"`
	DenyOut            []string `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool    `json:"allowPublicTraffic,omitempty"`
}

func networkView(sb store.E2BSandbox) *networkOut {
	if len(sb.AllowOut) == 0 && len(sb.DenyOut) == 0 && sb.Traffic == "" {
		return nil
	}
	n := &networkOut{AllowOut: sb.AllowOut, DenyOut: sb.DenyOut}
	if sb.Traffic != "" {
		public := sb.Traffic == TrafficPublic
		n.AllowPublicTraffic = &public
	}
	return n
}

func prefixStrings(ps []netip.Prefix) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

// applyNetwork gives the sandbox's VM the policy.
func (s *Server) applyNetwork(ctx context.Context, id string, p netns.EgressPolicy) error {
	if s.cfg.Network == nil {
		return errorf(501, "this kiln server cannot apply network rules (its backend has no VM engine)")
	}
	err := s.cfg.Network.SetEgressPolicy(ctx, id, p)
	switch {
	case errors.Is(err, errdefs.ErrConflict):
		return errorf(409, "sandbox %s has no internet access, so there is nothing to allow or deny: create it with allowInternetAccess true or a network allowOut/denyOut", id)
	case errors.Is(err, errdefs.ErrInvalid):
		return errorf(400, "network: %v", err)
	case errors.Is(err, errdefs.ErrNotFound):
		return errorf(404, "sandbox %s not found", id)
	case err != nil:
		return fmt.Errorf("applying network rules: %w", err)
	}
	return nil
}

// updateNetwork is PUT /sandboxes/{id}/network: the rules are replaced
// as a whole (an omitted field is cleared), in the VM's nftables at once.
func (s *Server) updateNetwork(ctx context.Context, q *request) (int, any, error) {
	var in networkIn
	if err := json.Unmarshal(q.body, &in); err != nil {
		return 0, nil, errorf(400, "request body is not a valid SandboxNetworkUpdateConfig: %v", err)
	}
	if in.AllowPublicTraffic != nil || in.MaskRequestHost != nil {
		return 0, nil, errorf(400, "allowPublicTraffic and maskRequestHost are set at create only")
	}
	p, err := parseNetwork(in)
	if err != nil {
		return 0, nil, err
	}
	id := q.r.PathValue("id")
	sb, _, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	if err := s.applyNetwork(ctx, id, p); err != nil {
		return 0, nil, err
	}
	sb.AllowOut, sb.DenyOut = prefixStrings(p.Allow), prefixStrings(p.Deny)
	if err := s.cfg.Sandboxes.PutE2BSandbox(ctx, sb); err != nil {
		return 0, nil, fmt.Errorf("recording the network rules: %w", err)
	}
	return 204, nil, nil
}
