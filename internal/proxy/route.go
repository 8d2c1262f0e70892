package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// A Target with its own Dial (kiln edge) has no guest address the edge
// could pool connections by: two guests on two nodes may have the same
// one. Its upstream host is made from its Route instead, a name under
// routeSuffix that no DNS resolves, and every pool (h1Upstream's idle
// lists, the Transports', the TLS memo) keys on that host. The dial
// behind every pool goes through Server.dial, which reaches a route host
// only through the Dial of the request that made it.
const routeSuffix = ".route.kiln.invalid"

// routeHost is the upstream host:port of a Route's port: a hash, so that
// any Route (node names, ids) gives a valid host name.
func routeHost(route string, port uint16) string {
	sum := sha256.Sum256([]byte(route))
	return "r" + hex.EncodeToString(sum[:16]) + routeSuffix + ":" + strconv.Itoa(int(port))
}

// routeDial is a request's Target.Dial, carried in its context to
// Server.dial.
type routeDial struct {
	host string
	port uint16
	dial func(ctx context.Context, port uint16) (net.Conn, error)
}

// dial is the dial behind every upstream pool. A route host is dialled
// only for the request whose Target named it (a pool dials with the
// context of the request that missed it); Config.Dial never sees one.
func (s *Server) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if rd, ok := ctx.Value(keyRoute).(*routeDial); ok {
		if addr != rd.host {
			return nil, fmt.Errorf("proxy: refusing to dial %s for a request routed to %s", addr, rd.host)
		}
		return rd.dial(ctx, rd.port)
	}
	if h, _, err := net.SplitHostPort(addr); err == nil && strings.HasSuffix(h, routeSuffix) {
		return nil, fmt.Errorf("proxy: %s is a tunnel route, and this request carries none", addr)
	}
	return s.cfg.Dial(ctx, network, addr)
}
