package pkgproxy

import (
	"fmt"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/base"
)

// HostMirrors returns the mirrors build VMs' apt traffic is proxied to:
// every http:// "deb" source of the host's apt configuration in etcApt
// ("" = /etc/apt; one-line and deb822 files, as the managed Debian base
// is built from them), plus the operator's extra mirror URIs. https://
// sources are skipped (see ParseMirror); a bad extra URI is an error.
func HostMirrors(etcApt string, extra []string) ([]Mirror, error) {
	if etcApt == "" {
		etcApt = "/etc/apt"
	}
	srcs, err := base.HostAptSources(etcApt)
	if err != nil {
		return nil, err
	}
	seen := map[Mirror]bool{}
	var out []Mirror
	for _, s := range srcs {
		m, err := ParseMirror(s.URI)
		if err != nil || seen[m] {
			continue
		}
		seen[m] = true
		out = append(out, m)
	}
	for _, u := range extra {
		m, err := ParseMirror(u)
		if err != nil {
			return nil, fmt.Errorf("--apt-mirror: %w", err)
		}
		if !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no http:// Debian mirror in %s's sources and none given with --apt-mirror: %w", etcApt, errdefs.ErrInvalid)
	}
	return out, nil
}
