// Package pkgproxy is kiln's caching proxy for the Debian package
// downloads of build VMs. One Proxy serves the whole kiln process; each
// build VM gets its own listener at its gateway (inside the VM's network
// namespace, as internal/dnsfwd does), and the VM network redirects the
// guest's plain-HTTP connections to the operator's mirrors there
// (netns.Config.PackageProxy, nftables DNAT): nothing in the image needs
// to know.
//
// What is cached, and for whom: pool files and by-hash indexes (names
// that never get other content) are kept on disk per account, in
// DIR/accounts/SCOPE where SCOPE is the build's account scope
// (image.ScopeName), bounded in size with least-recently-used eviction.
// One account's requests never fill or read another's cache. Other index
// files (InRelease, Release) pass through. Apt checks every file against
// the signed InRelease, so the cache adds no trust; a by-hash file is
// also checked against its name's digest before it is kept.
//
// The proxy fetches only from the configured mirrors, at the addresses
// kiln resolved for them, through internal/egress's dialer allowing
// exactly those addresses: a guest cannot make it fetch anything else,
// and the guest itself still may not reach those addresses directly.
package pkgproxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
)

// Defaults.
const (
	// DefaultPort is where each VM's listener sits on the gateway
	// (apt-cacher-ng's port, for whoever reads a packet capture).
	DefaultPort = 3142
	// DefaultAccountBytes bounds one account's cache.
	DefaultAccountBytes = 4 << 30
	// DefaultFileBytes bounds one file (the largest Debian packages are a
	// few hundred MB).
	DefaultFileBytes = 1 << 30
	// DefaultRequestTimeout bounds one request, upstream and guest sides.
	DefaultRequestTimeout = 10 * time.Minute
	// maxConns bounds one VM's connections to its listener; apt opens one
	// or two per host.
	maxConns = 16
	// resolveTTL: addresses kiln resolved for the mirrors are reused for
	// this long before a dial resolves again.
	resolveTTL = time.Minute
)

// Config configures a Proxy.
type Config struct {
	// Mirrors are the operator's Debian mirrors (see HostMirrors).
	Mirrors []Mirror
	// Dir is the cache's root; each account's files are under
	// Dir/accounts/SCOPE.
	Dir string
	// AccountBytes bounds each account's cache; 0 = DefaultAccountBytes.
	AccountBytes int64
	// FileBytes bounds one upstream response; 0 = DefaultFileBytes.
	FileBytes int64
	// RequestTimeout bounds one request; 0 = DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Lookup resolves a mirror's host name to IPv4 addresses; nil = the
	// host's resolver. An address literal is used as it is.
	Lookup func(ctx context.Context, host string) ([]netip.Addr, error)
	Logger *slog.Logger
}

// Stats count one account's requests.
type Stats struct {
	// Hits were served from the account's cache; Fetches are cacheable
	// files a mirror sent (misses, 200 only); Passed are other requests
	// passed through (InRelease, errors, …); Refused were not served.
	Hits, Fetches, Passed, Refused atomic.Int64
}

// Proxy is the shared part: mirrors, upstream client, caches.
type Proxy struct {
	cfg    Config
	log    *slog.Logger
	client *http.Client

	mu       sync.Mutex
	resolved map[string]resolved
	stores   map[string]*store
	stats    map[string]*Stats
}

type resolved struct {
	addrs []netip.Addr
	at    time.Time
}

// New checks cfg and returns a Proxy. It starts nothing: Serve does.
func New(cfg Config) (*Proxy, error) {
	if len(cfg.Mirrors) == 0 {
		return nil, fmt.Errorf("package proxy: no Debian mirror configured: %w", errdefs.ErrInvalid)
	}
	if cfg.Dir == "" {
		return nil, fmt.Errorf("package proxy: no cache folder: %w", errdefs.ErrInvalid)
	}
	if cfg.AccountBytes <= 0 {
		cfg.AccountBytes = DefaultAccountBytes
	}
	if cfg.FileBytes <= 0 {
		cfg.FileBytes = DefaultFileBytes
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.Lookup == nil {
		cfg.Lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip4", host)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger, resolved: map[string]resolved{}, stores: map[string]*store{}, stats: map[string]*Stats{}}
	p.client = &http.Client{
		Transport: &http.Transport{
			Proxy:       nil,
			DialContext: p.dial,
			// Files are cached as the mirror stores them.
			DisableCompression:     true,
			MaxIdleConnsPerHost:    4,
			IdleConnTimeout:        30 * time.Second,
			ResponseHeaderTimeout:  60 * time.Second,
			MaxResponseHeaderBytes: 64 << 10,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			// A redirect may only lead to another configured mirror: the
			// dialer refuses any other host.
			if len(via) >= 3 || req.URL.Scheme != "http" {
				return errors.New("redirect out of the configured mirrors")
			}
			return nil
		},
	}
	return p, nil
}

// Mirrors returns the configured mirrors.
func (p *Proxy) Mirrors() []Mirror { return append([]Mirror(nil), p.cfg.Mirrors...) }

// Stats returns the counters of one account scope (created on first use).
func (p *Proxy) Stats(scope string) *Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats[scope]
	if s == nil {
		s = &Stats{}
		p.stats[scope] = s
	}
	return s
}

// Resolve looks up every mirror host now and returns their IPv4
// addresses, which a VM network redirects to the proxy. A host that does
// not resolve is left out (logged); none resolving is an error.
func (p *Proxy) Resolve(ctx context.Context) ([]netip.Addr, error) {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	var errs []error
	for _, m := range p.cfg.Mirrors {
		as, err := p.lookup(ctx, m.Host, true)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, a := range as {
			if !seen[a] {
				seen[a] = true
				out = append(out, a)
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("resolving the Debian mirrors: %w", errors.Join(errs...))
	}
	for _, err := range errs {
		p.log.Warn("pkgproxy: a mirror does not resolve", "err", err)
	}
	return out, nil
}

// lookup returns host's IPv4 addresses, from the last resolution unless
// it is older than resolveTTL or fresh is set.
func (p *Proxy) lookup(ctx context.Context, host string, fresh bool) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	p.mu.Lock()
	r, ok := p.resolved[host]
	p.mu.Unlock()
	if ok && !fresh && time.Since(r.at) < resolveTTL {
		return r.addrs, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	as, err := p.cfg.Lookup(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", host, err)
	}
	var v4 []netip.Addr
	for _, a := range as {
		if a = a.Unmap(); a.Is4() {
			v4 = append(v4, a)
		}
	}
	if len(v4) == 0 {
		return nil, fmt.Errorf("resolving %s: no IPv4 address", host)
	}
	p.mu.Lock()
	p.resolved[host] = resolved{addrs: v4, at: time.Now()}
	p.mu.Unlock()
	return v4, nil
}

// dial connects to a configured mirror only, at the addresses kiln
// resolved for it, through the egress dialer allowing exactly those.
func (p *Proxy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := hostPort(addr)
	if err != nil {
		return nil, err
	}
	known := false
	for _, m := range p.cfg.Mirrors {
		known = known || (m.Host == host && m.Port == port)
	}
	if !known {
		return nil, fmt.Errorf("%s is not a configured mirror: %w", addr, egress.ErrNotAllowed)
	}
	as, err := p.lookup(ctx, host, false)
	if err != nil {
		return nil, err
	}
	allow := make([]netip.Prefix, len(as))
	for i, a := range as {
		allow[i] = netip.PrefixFrom(a, 32)
	}
	d := (&egress.Policy{Allow: allow}).Dialer(10 * time.Second)
	var errs []error
	for _, a := range as {
		c, err := d.DialContext(ctx, "tcp4", netip.AddrPortFrom(a, port).String())
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// ServeConfig is one VM's listener.
type ServeConfig struct {
	// ID is the VM's id (logs).
	ID string
	// NSPath is the VM's network namespace; "" = the current one (tests).
	NSPath string
	// Listen is the address; "" = the gateway, DefaultPort.
	Listen string
	// Scope is the account's cache scope (image.ScopeName of the
	// account): the only cache this VM's requests read and fill.
	Scope string
	// Client is the only source served; zero = netns.GuestAddr.
	Client netip.Addr
}

// Listener is one VM's running listener.
type Listener struct {
	srv *http.Server
	ln  net.Listener
}

// Addr is the listening address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Close stops serving; requests in flight are cut. Safe to call twice.
func (l *Listener) Close() error {
	err := l.srv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Serve opens a listener (inside sc.NSPath) that serves sc.Scope's cache
// to sc.Client until Close.
func (p *Proxy) Serve(ctx context.Context, sc ServeConfig) (*Listener, error) {
	if len(sc.Scope) < 8 || !isHex(sc.Scope) {
		return nil, fmt.Errorf("package proxy: cache scope %q is not a scope name: %w", sc.Scope, errdefs.ErrInvalid)
	}
	if sc.Listen == "" {
		sc.Listen = netip.AddrPortFrom(netns.GatewayAddr, DefaultPort).String()
	}
	if !sc.Client.IsValid() {
		sc.Client = netns.GuestAddr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var ln net.Listener
	listen := func() (err error) { ln, err = net.Listen("tcp4", sc.Listen); return err }
	var err error
	if sc.NSPath != "" {
		err = netns.RunInNS(sc.NSPath, listen)
	} else {
		err = listen()
	}
	if err != nil {
		return nil, fmt.Errorf("package proxy listening on %s: %w", sc.Listen, err)
	}
	h := &handler{p: p, sc: sc, st: p.store(sc.Scope), stats: p.Stats(sc.Scope), log: p.log.With("microvm", sc.ID)}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}
	l := &Listener{srv: srv, ln: &limitListener{Listener: ln, sem: make(chan struct{}, maxConns)}}
	go func() { _ = srv.Serve(l.ln) }()
	return l, nil
}

type handler struct {
	p     *Proxy
	sc    ServeConfig
	st    *store
	stats *Stats
	log   *slog.Logger
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err != nil || ap.Addr().Unmap() != h.sc.Client {
		h.stats.Refused.Add(1)
		http.Error(w, "not served", http.StatusForbidden)
		return
	}
	bodyLen := r.ContentLength
	if len(r.TransferEncoding) > 0 {
		bodyLen = -1
	}
	t, err := parseTarget(h.p.cfg.Mirrors, r.Method, r.Host, r.RequestURI, bodyLen)
	if err != nil {
		h.stats.Refused.Add(1)
		var rf *refusal
		errors.As(err, &rf)
		h.log.Debug("pkgproxy: refused", "err", err)
		http.Error(w, "kiln package proxy: "+rf.msg+"\n(it serves GET and HEAD of dists/ and pool/ on the Debian mirrors in kiln's apt sources)", rf.status)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.p.cfg.RequestTimeout)
	defer cancel()
	// A guest that stops reading must not hold the request forever.
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(h.p.cfg.RequestTimeout))
	if t.immutable {
		if f, ok := h.st.open(t); ok {
			defer f.Close()
			h.stats.Hits.Add(1)
			w.Header().Set("Content-Type", "application/octet-stream")
			http.ServeContent(w, r, "", time.Time{}, f)
			return
		}
	}
	h.forward(ctx, w, r, t)
}

// forward fetches t from its mirror and streams it to the guest; a
// complete cacheable 200 is kept in the account's cache.
func (h *handler) forward(ctx context.Context, w http.ResponseWriter, r *http.Request, t target) {
	method := "GET"
	if t.head {
		method = "HEAD"
	}
	u := "http://" + net.JoinHostPort(t.mirror.Host, strconv.Itoa(int(t.mirror.Port))) + t.path
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		http.Error(w, "bad request target", http.StatusBadRequest)
		return
	}
	req.Host = t.mirror.Host
	if t.mirror.Port != 80 {
		req.Host = net.JoinHostPort(t.mirror.Host, strconv.Itoa(int(t.mirror.Port)))
	}
	req.Header.Set("User-Agent", "kiln-pkgproxy")
	// apt asks for an index it already holds (InRelease) with
	// If-Modified-Since; passed on, the mirror answers 304 and apt keeps
	// its file. Without it apt rewrote an unchanged InRelease, and a newer
	// InRelease makes apt rebuild pkgcache.bin from every Packages index:
	// over a minute of a rebuild's apt step under TCG (kiln bench image
	// --apt). Only a well-formed date goes upstream, formatted by kiln;
	// cached files are fetched whole.
	if !t.immutable {
		if ims, err := http.ParseTime(r.Header.Get("If-Modified-Since")); err == nil {
			req.Header.Set("If-Modified-Since", ims.UTC().Format(http.TimeFormat))
		}
	}
	resp, err := h.p.client.Do(req)
	if err == nil && !t.immutable && !t.head && resp.StatusCode == http.StatusOK && resp.ContentLength <= indexBytes {
		defer resp.Body.Close()
		h.stats.Passed.Add(1)
		h.serveIndex(w, r, t, resp)
		return
	}
	if err != nil {
		h.stats.Passed.Add(1)
		h.log.Info("pkgproxy: mirror fetch failed", "url", u, "err", err)
		http.Error(w, "kiln package proxy: the mirror did not answer: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	cacheable := t.immutable && !t.head && resp.StatusCode == http.StatusOK
	if cacheable {
		h.stats.Fetches.Add(1)
	} else {
		h.stats.Passed.Add(1)
	}
	if resp.ContentLength > h.p.cfg.FileBytes {
		http.Error(w, fmt.Sprintf("kiln package proxy: the file is over the %d-byte limit", h.p.cfg.FileBytes), http.StatusBadGateway)
		return
	}
	for _, k := range []string{"Content-Type", "Content-Length", "Last-Modified", "ETag"} {
		if v := resp.Header.Get(k); v != "" {
			w.Header().Set(k, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	if t.head {
		return
	}
	body := io.LimitReader(resp.Body, h.p.cfg.FileBytes+1)
	if !cacheable {
		_, _ = io.Copy(w, body)
		return
	}
	if err := h.st.fill(t, resp.ContentLength, body, w, h.p.cfg.FileBytes, h.p.cfg.AccountBytes); err != nil {
		h.log.Info("pkgproxy: not cached", "url", u, "err", err)
	}
}

// indexBytes bounds the mutable indexes (InRelease, Release) kiln holds in
// memory to validate; a larger one is passed on as it comes.
const indexBytes = 4 << 20

// serveIndex answers a mutable index the mirror sent whole. Some mirrors
// and the gateways in front of them ignore If-Modified-Since and send no
// Last-Modified, so every rebuild got a "new" InRelease and apt rebuilt
// its package cache from every list (over a minute of a TCG build's apt
// step). kiln keeps its own validator per account instead: the index's
// digest and when kiln first saw that content, sent as Last-Modified, so
// a guest asking If-Modified-Since for unchanged content gets 304.
func (h *handler) serveIndex(w http.ResponseWriter, r *http.Request, t target, resp *http.Response) {
	b, err := io.ReadAll(io.LimitReader(resp.Body, indexBytes+1))
	if err != nil {
		http.Error(w, "kiln package proxy: reading the index from the mirror: "+err.Error(), http.StatusBadGateway)
		return
	}
	if int64(len(b)) > indexBytes {
		// Longer than it said (no Content-Length): no validator.
		w.Header().Set("Content-Type", resp.Header.Get("Content-Type"))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(b)
		_, _ = io.Copy(w, io.LimitReader(resp.Body, h.p.cfg.FileBytes+1-int64(len(b))))
		return
	}
	since := h.st.indexSince(t, sha256.Sum256(b))
	w.Header().Set("Last-Modified", since.Format(http.TimeFormat))
	if ims, err := http.ParseTime(r.Header.Get("If-Modified-Since")); err == nil && !since.After(ims) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	if ct := resp.Header.Get("Content-Type"); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

// limitListener bounds the connections open at once.
type limitListener struct {
	net.Listener
	sem chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.sem <- struct{}{}:
			return &limitConn{Conn: c, release: func() { <-l.sem }}, nil
		default:
			c.Close()
		}
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// store is one account's cache folder.
type store struct {
	dir string
	mu  sync.Mutex
	// size is the bytes kept, known after the first fill (-1 before).
	size int64
	// indexes are the validators of mutable indexes (serveIndex), in
	// memory: after a restart a guest simply gets the index once more.
	indexes map[string]indexValidator
}

type indexValidator struct {
	digest [sha256.Size]byte
	since  time.Time
}

// maxIndexes bounds the validators an account keeps (a suite has a few
// indexes per mirror).
const maxIndexes = 1024

// indexSince returns when the account's cache first saw t with this
// digest: a new digest moves it to now, and always past the old one, so
// a guest holding the old content never matches.
func (s *store) indexSince(t target, digest [sha256.Size]byte) time.Time {
	k := s.key(t)
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.indexes[k]
	if ok && v.digest == digest {
		return v.since
	}
	since := time.Now().UTC().Truncate(time.Second)
	if ok && !since.After(v.since) {
		since = v.since.Add(time.Second)
	}
	if s.indexes == nil || len(s.indexes) >= maxIndexes {
		s.indexes = map[string]indexValidator{}
	}
	s.indexes[k] = indexValidator{digest: digest, since: since}
	return since
}

func (p *Proxy) store(scope string) *store {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stores[scope]
	if s == nil {
		s = &store{dir: filepath.Join(p.cfg.Dir, "accounts", scope), size: -1}
		p.stores[scope] = s
	}
	return s
}

// key names t's file: a hash of mirror and path, so no guest-chosen
// string becomes a file name.
func (s *store) key(t target) string {
	h := sha256.Sum256([]byte(t.mirror.String() + "\x00" + t.path))
	k := hex.EncodeToString(h[:])
	return filepath.Join(s.dir, k[:2], k)
}

// open returns t's cached file, marking it used (its mtime orders
// eviction).
func (s *store) open(t target) (*os.File, bool) {
	p := s.key(t)
	f, err := os.Open(p)
	if err != nil {
		return nil, false
	}
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	return f, true
}

// fill copies body to the guest and into a temporary file; a complete
// body (the promised length, and for by-hash names the promised digest)
// is renamed into place, then the cache is trimmed to limit.
func (s *store) fill(t target, length int64, body io.Reader, w io.Writer, fileMax, limit int64) error {
	dst := s.key(t)
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		_, _ = io.Copy(w, body)
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".fill-*")
	if err != nil {
		_, _ = io.Copy(w, body)
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	d := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, d, w), body)
	switch {
	case err != nil:
		return err
	case n > fileMax:
		return fmt.Errorf("over the %d-byte file limit", fileMax)
	case length >= 0 && n != length:
		return fmt.Errorf("got %d of %d bytes", n, length)
	case t.sha256 != "" && hex.EncodeToString(d.Sum(nil)) != t.sha256:
		return errors.New("content does not match the by-hash digest")
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var old int64
	if fi, err := os.Stat(dst); err == nil {
		old = fi.Size()
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return err
	}
	if s.size < 0 {
		s.size = s.walkLocked()
	} else {
		s.size += n - old
	}
	if s.size > limit {
		s.evictLocked(limit * 9 / 10)
	}
	return nil
}

// walkLocked sums the sizes of the cached files.
func (s *store) walkLocked() int64 {
	var total int64
	for _, f := range s.filesLocked() {
		total += f.size
	}
	return total
}

type cachedFile struct {
	path  string
	size  int64
	mtime time.Time
}

func (s *store) filesLocked() []cachedFile {
	var out []cachedFile
	_ = filepath.WalkDir(s.dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		if d.Name()[0] == '.' {
			// A fill that a crash interrupted; one in progress is younger.
			if time.Since(fi.ModTime()) > time.Hour {
				_ = os.Remove(p)
			}
			return nil
		}
		out = append(out, cachedFile{path: p, size: fi.Size(), mtime: fi.ModTime()})
		return nil
	})
	return out
}

// evictLocked removes the least recently used files until the cache
// holds at most target bytes.
func (s *store) evictLocked(target int64) {
	files := s.filesLocked()
	sort.Slice(files, func(i, j int) bool { return files[i].mtime.Before(files[j].mtime) })
	var total int64
	for _, f := range files {
		total += f.size
	}
	for _, f := range files {
		if total <= target {
			break
		}
		if os.Remove(f.path) == nil {
			total -= f.size
		}
	}
	s.size = total
}
