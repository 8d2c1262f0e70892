package e2b

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// policies is a Policer (kiln's own interface) that records what each
// sandbox's VM was given, refusing VMs without egress as the engine does.
type policies struct {
	st      store.Store
	account string
	mu      sync.Mutex
	by      map[string]netns.EgressPolicy
	domains map[string][]string
}

func (p *policies) SetEgressPolicy(ctx context.Context, id string, pol netns.EgressPolicy, domains []string) error {
	m, err := p.st.GetMicrovm(ctx, p.account, id)
	if err != nil {
		return err
	}
	if len(m.EgressNetworkConnectors) == 0 {
		return fmt.Errorf("no egress: %w", errdefs.ErrConflict)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.by[id] = pol
	p.domains[id] = domains
	return nil
}

func (p *policies) of(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	pol, ok := p.by[id]
	if !ok {
		return "none"
	}
	out := fmt.Sprintf("allow %v deny %v", pol.Allow, pol.Deny)
	if d := p.domains[id]; len(d) > 0 {
		out += fmt.Sprintf(" domains %v", d)
	}
	return out
}

// TestNetwork: create-time rules reach the VM before the sandbox is
// handed out, PUT replaces them, and bad entries are 400s saying what to
// give instead.
func TestNetwork(t *testing.T) {
	e := newEnv(t)
	pol := &policies{st: e.st, account: e.account, by: map[string]netns.EgressPolicy{}, domains: map[string][]string{}}
	e.srv.cfg.Network = pol
	create := e.create
	id := create(map[string]any{"templateID": "tmpl", "network": map[string]any{"allowOut": []string{"1.1.1.1", "API.example.com", "*.pypi.org"}, "denyOut": []string{"10.0.0.0/8", "8.8.0.0/16"}}})
	if got := pol.of(id); got != "allow [1.1.1.1/32] deny [10.0.0.0/8 8.8.0.0/16] domains [api.example.com *.pypi.org]" {
		t.Fatalf("create applied %s", got)
	}
	var d struct {
		AllowInternetAccess bool
		Network             networkOut
	}
	e.do(e.key, "GET", "/sandboxes/"+id, nil).json(t, &d)
	if !d.AllowInternetAccess || strings.Join(d.Network.AllowOut, ",") != "1.1.1.1/32,api.example.com,*.pypi.org" || len(d.Network.DenyOut) != 2 {
		t.Fatalf("getInfo: %+v", d)
	}
	closed := create(map[string]any{"templateID": "tmpl", "allow_internet_access": false, "network": map[string]any{"allowOut": []string{"192.0.2.0/24"}}})
	if got := pol.of(closed); got != "allow [192.0.2.0/24] deny [0.0.0.0/0]" {
		t.Fatalf("allow_internet_access false with allowOut applied %s", got)
	}
	plain := create(map[string]any{"templateID": "tmpl"})
	if got := pol.of(plain); got != "none" {
		t.Fatalf("a sandbox without rules got %s", got)
	}

	// Runtime: replaced as a whole; omitted fields are cleared.
	e.want(e.do(e.key, "PUT", "/sandboxes/"+id+"/network", map[string]any{"denyOut": []string{"93.184.216.34"}}), 204, "update")
	if got := pol.of(id); got != "allow [] deny [93.184.216.34/32]" {
		t.Fatalf("update applied %s", got)
	}
	e.want(e.do(e.key, "PUT", "/sandboxes/"+id+"/network", map[string]any{"allow_internet_access": false}), 204, "update")
	if got := pol.of(id); got != "allow [] deny [0.0.0.0/0]" {
		t.Fatalf("allow_internet_access false applied %s", got)
	}
	e.want(e.do(e.key, "PUT", "/sandboxes/"+plain+"/network", map[string]any{"denyOut": []string{"1.2.3.4"}}), 409, "a sandbox without egress")
	e.want(e.do(e.otherKey, "PUT", "/sandboxes/"+id+"/network", map[string]any{}), 404, "another account's sandbox")

	for _, tc := range []struct {
		name string
		net  map[string]any
		want string // in the message
	}{
		{"bad CIDR", map[string]any{"denyOut": []string{"1.2.3.4/33"}}, "not an IPv4 CIDR block"},
		{"garbage", map[string]any{"allowOut": []string{"not an address"}}, "not an IPv4 CIDR block"},
		{"domain in denyOut", map[string]any{"denyOut": []string{"example.com"}}, "allowOut only"},
		{"bad domain", map[string]any{"allowOut": []string{"*.-bad-.com"}}, "not a valid domain name"},
		{"bare wildcard", map[string]any{"allowOut": []string{"*"}}, "not an IPv4 CIDR block"},
		{"IPv6", map[string]any{"denyOut": []string{"2001:db8::/32"}}, "IPv6"},
		{"transform rules", map[string]any{"rules": map[string]any{"a.com": []any{map[string]any{}}}}, "rules"},
		{"too many", map[string]any{"denyOut": make([]string, netns.MaxPolicyPrefixes+1)}, "at most"},
	} {
		for _, how := range []string{"create", "update"} {
			var a answer
			if how == "create" {
				a = e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "network": tc.net})
			} else {
				a = e.do(e.key, "PUT", "/sandboxes/"+id+"/network", tc.net)
			}
			e.want(a, 400, how+" "+tc.name)
			var er apiError
			json.Unmarshal(a.body, &er)
			if !strings.Contains(er.Message, tc.want) {
				t.Errorf("%s %s: message %q does not say %q", how, tc.name, er.Message, tc.want)
			}
		}
	}
	if got := pol.of(id); got != "allow [] deny [0.0.0.0/0]" {
		t.Fatalf("refused updates changed the rules to %s", got)
	}
}

func FuzzParseNetwork(f *testing.F) {
	f.Add([]byte(`{"allowOut":["1.1.1.1","10.0.0.0/8"],"denyOut":["0.0.0.0/0"],"allow_internet_access":false}`))
	f.Add([]byte(`{"allowOut":["example.com","*.x.org"],"denyOut":["::1","1.2.3.4/33"]}`))
	f.Add([]byte(`{"rules":{"a":[]},"maskRequestHost":"x"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var in networkIn
		if json.Unmarshal(body, &in) != nil {
			return
		}
		r, err := parseNetwork(in)
		if err != nil {
			return
		}
		p := r.policy
		if err := p.Check(); err != nil {
			t.Fatalf("accepted a policy netns refuses: %v", err)
		}
		for _, d := range r.domains {
			if !validDomain(d) || d != strings.ToLower(d) {
				t.Fatalf("accepted domain %q", d)
			}
		}
		for _, x := range append(append([]netip.Prefix{}, p.Allow...), p.Deny...) {
			if x != x.Masked() {
				t.Fatalf("prefix %s not masked", x)
			}
		}
	})
}
