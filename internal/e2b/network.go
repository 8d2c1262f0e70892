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
	// SetEgressPolicy replaces the VM's rules; allowDomains open the
	// addresses its DNS answers for them.
	SetEgressPolicy(ctx context.Context, id string, p netns.EgressPolicy, allowDomains []string) error
}

// rules are a sandbox's checked egress rules.
type rules struct {
	policy  netns.EgressPolicy
	domains []string // allowOut names ("example.com", "*.example.com")
}

func (r rules) empty() bool { return len(r.policy.Allow)+len(r.policy.Deny)+len(r.domains) == 0 }

// allowOut is the rules' allowOut as getInfo shows it.
func (r rules) allowOut() []string { return append(prefixStrings(r.policy.Allow), r.domains...) }

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

// parseNetwork checks the egress rules: allowOut entries are IPv4 CIDR
// blocks, addresses or domain names ("example.com", "*.example.com"),
// denyOut entries blocks or addresses (E2B allows no names there). The
// rest is refused with what to do.
func parseNetwork(in networkIn) (rules, error) {
	var r rules
	p := &r.policy
	switch {
	case set(in.EgressProxy):
		return r, errorf(400, "network.egressProxy is not supported by kiln")
	case set(in.Rules):
		return r, errorf(400, "network.rules (request transforms) are not supported by kiln")
	case set(in.HTTPSPorts):
		return r, errorf(400, "network.httpsPorts is not supported by kiln")
	case in.MaskRequestHost != nil:
		return r, errorf(400, "network.maskRequestHost is not supported by kiln")
	}
	if n := len(in.AllowOut) + len(in.DenyOut); n > netns.MaxPolicyPrefixes {
		return r, errorf(400, "network has %d allowOut and denyOut entries; at most %d", n, netns.MaxPolicyPrefixes)
	}
	var err error
	if p.Allow, r.domains, err = parsePrefixes("allowOut", in.AllowOut, true); err != nil {
		return r, err
	}
	if p.Deny, _, err = parsePrefixes("denyOut", in.DenyOut, false); err != nil {
		return r, err
	}
	if in.AllowInternetAccess != nil && !*in.AllowInternetAccess {
		// E2B: the same as denying 0.0.0.0/0 (allowOut still wins).
		p.Deny = append(p.Deny, netip.MustParsePrefix("0.0.0.0/0"))
	}
	return r, nil
}

// parsePrefixes reads IPv4 CIDR blocks ("8.8.8.0/24") and addresses
// ("8.8.8.8", a /32), and with names domain patterns (lowercased).
func parsePrefixes(field string, entries []string, names bool) ([]netip.Prefix, []string, error) {
	out := make([]netip.Prefix, 0, len(entries))
	var domains []string
	for _, e := range entries {
		if len(e) > 255 {
			return nil, nil, errorf(400, "network.%s entry %.64q... is too long: give an IPv4 CIDR block or address, or a domain name", field, e)
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
		case err != nil && looksLikeDomain(e) && names:
			if !validDomain(e) {
				return nil, nil, errorf(400, "network.%s entry %q is not a valid domain name: labels of letters, digits and '-' (1-63 bytes, at most 253 in all), optionally after \"*.\"", field, e)
			}
			domains = append(domains, strings.ToLower(e))
			continue
		case err != nil && looksLikeDomain(e):
			return nil, nil, errorf(400, "network.%s entry %q: domain names are allowed in allowOut only (as in E2B): give IPv4 CIDR blocks or addresses", field, e)
		case err != nil:
			return nil, nil, errorf(400, "network.%s entry %q is not an IPv4 CIDR block (like 8.8.8.0/24) or address (like 8.8.8.8)%s", field, e,
				map[bool]string{true: ", or a domain name (like example.com or *.example.com)"}[names])
		case !p.Addr().Is4():
			return nil, nil, errorf(400, "network.%s entry %q is IPv6: no IPv6 leaves a kiln sandbox, give IPv4 blocks", field, e)
		}
		out = append(out, p.Masked())
	}
	return out, domains, nil
}

// looksLikeDomain tells a name apart from a malformed address: something
// with a dot and a letter, or a leading "*.".
func looksLikeDomain(s string) bool {
	if strings.HasPrefix(s, "*.") {
		return true
	}
	return strings.Contains(s, ".") && strings.IndexFunc(s, func(c rune) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }) >= 0 &&
		!strings.ContainsAny(s, ":/")
}

// validDomain checks a domain pattern: an optional "*." and at least two
// labels of letters, digits and '-' (not at either end), 1-63 bytes each,
// at most 253 in all.
func validDomain(s string) bool {
	s = strings.TrimPrefix(s, "*.")
	if len(s) > 253 {
		return false
	}
	labels := strings.Split(s, ".")
	if len(labels) < 2 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c == '-' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
				return false
			}
		}
	}
	return true
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

// applyNetwork gives the sandbox's VM the rules.
func (s *Server) applyNetwork(ctx context.Context, id string, r rules) error {
	if s.cfg.Network == nil {
		return errorf(501, "this kiln server cannot apply network rules (its backend has no VM engine)")
	}
	err := s.cfg.Network.SetEgressPolicy(ctx, id, r.policy, r.domains)
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
	r, err := parseNetwork(in)
	if err != nil {
		return 0, nil, err
	}
	id := q.r.PathValue("id")
	sb, _, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	if err := s.applyNetwork(ctx, id, r); err != nil {
		return 0, nil, err
	}
	sb.AllowOut, sb.DenyOut = r.allowOut(), prefixStrings(r.policy.Deny)
	if err := s.cfg.Sandboxes.PutE2BSandbox(ctx, sb); err != nil {
		return 0, nil, fmt.Errorf("recording the network rules: %w", err)
	}
	return 204, nil, nil
}
