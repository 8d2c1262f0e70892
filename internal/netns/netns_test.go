package netns_test

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/netns"
)

// TestDenyV4Documentation: guests are denied the documentation ranges
// like the rest of the list (a mirror answering there is reached through
// the package proxy, not directly). Before, DenyV4 left them out.
func TestDenyV4Documentation(t *testing.T) {
	for _, s := range []string{"192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "10.0.0.0/8", "169.254.0.0/16", "168.63.129.16/32"} {
		if !slices.Contains(netns.DenyV4, netip.MustParsePrefix(s)) {
			t.Errorf("%s is not denied to guests", s)
		}
	}
}
