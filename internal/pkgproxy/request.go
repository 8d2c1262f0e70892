package pkgproxy

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Mirror is one Debian mirror the operator configured: build VMs' plain
// HTTP to it goes through the proxy.
type Mirror struct {
	// Host is the lower-case host name or IPv4 address, without port.
	Host string
	// Port is the TCP port; the redirect covers port 80 only, so other
	// ports are reached only by clients that name the proxy themselves.
	Port uint16
	// Path is the archive's root on the host, with a trailing slash
	// ("/debian/"); only dists/ and pool/ below it are served.
	Path string
}

func (m Mirror) String() string {
	return "http://" + net.JoinHostPort(m.Host, strconv.Itoa(int(m.Port))) + m.Path
}

// ParseMirror parses an apt source URI. Only http:// is accepted: HTTPS
// cannot be cached without breaking TLS, so such a source stays what it
// is, a connection out that obeys the guest deny list.
func ParseMirror(uri string) (Mirror, error) {
	u, err := url.Parse(strings.TrimSpace(uri))
	if err != nil {
		return Mirror{}, fmt.Errorf("mirror %q: %w: %w", uri, err, errdefs.ErrInvalid)
	}
	if !strings.EqualFold(u.Scheme, "http") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return Mirror{}, fmt.Errorf("mirror %q: want http://HOST[:PORT]/PATH: %w", uri, errdefs.ErrInvalid)
	}
	host, port, err := hostPort(u.Host)
	if err != nil {
		return Mirror{}, fmt.Errorf("mirror %q: %w", uri, err)
	}
	p := u.EscapedPath()
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	if !strings.HasPrefix(p, "/") || !validPath(p) {
		return Mirror{}, fmt.Errorf("mirror %q: path %q: %w", uri, p, errdefs.ErrInvalid)
	}
	return Mirror{Host: host, Port: port, Path: p}, nil
}

// hostPort splits "host[:port]" (port 80 by default), lower-cases the
// host and drops a trailing dot.
func hostPort(hp string) (string, uint16, error) {
	host, port := hp, "80"
	if i := strings.LastIndexByte(hp, ':'); i >= 0 && !strings.Contains(hp[i:], "]") {
		host, port = hp[:i], hp[i+1:]
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || host == "" || len(host) > 253 {
		return "", 0, fmt.Errorf("host %q: %w", hp, errdefs.ErrInvalid)
	}
	for _, c := range host {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return "", 0, fmt.Errorf("host %q: %w", hp, errdefs.ErrInvalid)
		}
	}
	return host, uint16(n), nil
}

// Bounds on what a guest may send.
const (
	maxRequestURI = 2048
	// maxHeaderBytes bounds a request's header block (http.Server).
	maxHeaderBytes = 16 << 10
)

// target is a request the proxy serves.
type target struct {
	mirror Mirror
	// path is the escaped path on the mirror host (mirror.Path + rel).
	path string
	// rel is the path below the archive root: "dists/…" or "pool/…".
	rel string
	// immutable: a pool file or an index named by its hash. Such a name
	// never gets other content, so it is cached without revalidation.
	immutable bool
	// sha256 is the digest a by-hash/SHA256 name promises (lower-case
	// hex), checked before the file is cached.
	sha256 string
	head   bool
}

// refusal is a request the proxy will not serve, with what to tell the
// guest.
type refusal struct {
	status int
	msg    string
}

func (r *refusal) Error() string { return r.msg }

func refuse(status int, format string, a ...any) error {
	return &refusal{status: status, msg: fmt.Sprintf(format, a...)}
}

// parseTarget decides whether a guest's request is one the proxy serves:
// GET or HEAD, no body, of dists/ or pool/ below a configured mirror's
// archive root, on that mirror's host and port. host is the Host header
// and uri the request target as sent (origin form, or absolute form from
// a client that names the proxy). Everything here is untrusted input.
func parseTarget(mirrors []Mirror, method, host, uri string, bodyLen int64) (target, error) {
	var t target
	switch method {
	case "GET":
	case "HEAD":
		t.head = true
	default:
		return t, refuse(405, "method %.16q: only GET and HEAD are served", method)
	}
	if bodyLen != 0 {
		return t, refuse(400, "a request body is not accepted")
	}
	if len(uri) > maxRequestURI {
		return t, refuse(414, "request target longer than %d bytes", maxRequestURI)
	}
	path := uri
	if len(uri) >= 7 && strings.EqualFold(uri[:7], "http://") {
		rest := uri[7:]
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			return t, refuse(400, "request target has no path")
		}
		host, path = rest[:i], rest[i:]
	}
	if !strings.HasPrefix(path, "/") || !validPath(path) {
		return t, refuse(400, "request target %.200q is not a plain path (no query, no dot segments, no empty segments)", path)
	}
	h, port, err := hostPort(host)
	if err != nil {
		return t, refuse(400, "host %.100q is not a host name", host)
	}
	best := -1
	for i, m := range mirrors {
		if m.Host == h && m.Port == port && strings.HasPrefix(path, m.Path) && (best < 0 || len(m.Path) > len(mirrors[best].Path)) {
			best = i
		}
	}
	if best < 0 {
		return t, refuse(403, "%s%s is not below a Debian mirror that kiln's operator configured", h, truncate(path, 200))
	}
	t.mirror, t.path = mirrors[best], path
	t.rel = path[len(t.mirror.Path):]
	switch {
	case strings.HasPrefix(t.rel, "pool/"):
		t.immutable = strings.Count(t.rel, "/") >= 2 && !strings.HasSuffix(t.rel, "/")
	case strings.HasPrefix(t.rel, "dists/"):
		// dists/SUITE/…/by-hash/SHA256/HEX
		if i := strings.Index(t.rel, "/by-hash/SHA256/"); i >= 0 {
			d := t.rel[i+len("/by-hash/SHA256/"):]
			if len(d) == 64 && isHex(d) {
				t.immutable, t.sha256 = true, strings.ToLower(d)
			}
		}
	default:
		return t, refuse(403, "only dists/ and pool/ of a mirror are served, not %.200q", t.rel)
	}
	return t, nil
}

// validPath accepts an escaped path of the characters Debian archive
// names use, without query, fragment, dot or empty segments, and without
// escapes that decode to a separator or a control byte.
func validPath(p string) bool {
	if p == "" || p[0] != '/' {
		return false
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("-._~+:=,@/", c) >= 0:
		case c == '%':
			if i+2 >= len(p) || !isHex(p[i+1:i+3]) {
				return false
			}
			v, _ := strconv.ParseUint(p[i+1:i+3], 16, 8)
			if v < 0x20 || v == 0x7f || v == '/' || v == '\\' || v == '%' || v == '.' {
				return false
			}
			i += 2
		default:
			return false
		}
	}
	for _, seg := range strings.Split(p[1:], "/") {
		if seg == "." || seg == ".." {
			return false
		}
	}
	return !strings.Contains(p, "//")
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return len(s) > 0
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
