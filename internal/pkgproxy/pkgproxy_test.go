package pkgproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// upstream is a real HTTP server standing in for a Debian mirror on
// loopback; it counts the requests for each path.
type upstream struct {
	srv   *httptest.Server
	port  uint16
	mu    sync.Mutex
	count map[string]int
	files map[string][]byte
	// plain: ignore If-Modified-Since and send no Last-Modified.
	plain bool
}

func newUpstream(t *testing.T) *upstream {
	u := &upstream{count: map[string]int{}, files: map[string][]byte{}}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.count[r.URL.Path]++
		b, ok := u.files[r.URL.Path]
		u.mu.Unlock()
		if r.URL.Path == "/debian/pool/main/r/redirect_1_all.deb" {
			http.Redirect(w, r, "http://elsewhere.test:"+fmt.Sprint(u.port)+"/debian/pool/main/h/hello_1_amd64.deb", http.StatusFound)
			return
		}
		if !ok {
			http.NotFound(w, r)
			return
		}
		if u.plain {
			// A gateway that ignores If-Modified-Since and dates nothing.
			w.Write(b)
			return
		}
		// As a mirror does: an unchanged file since If-Modified-Since is 304.
		w.Header().Set("Last-Modified", upstreamModTime.Format(http.TimeFormat))
		if ims, err := http.ParseTime(r.Header.Get("If-Modified-Since")); err == nil && !upstreamModTime.After(ims) {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(u.srv.Close)
	ap := netip.MustParseAddrPort(u.srv.Listener.Addr().String())
	u.port = ap.Port()
	return u
}

func (u *upstream) put(path string, b []byte) {
	u.mu.Lock()
	u.files[path] = b
	u.mu.Unlock()
}

// url is path on the mirror as a guest names it.
func (u *upstream) url(path string) string {
	return fmt.Sprintf("http://%s:%d%s", mirrorHost, u.port, path)
}

func (u *upstream) hits(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.count[path]
}

const mirrorHost = "mirror.test"

// upstreamModTime is every mirror file's Last-Modified.
var upstreamModTime = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

func newProxy(t *testing.T, u *upstream, mod func(*Config)) *Proxy {
	cfg := Config{
		Mirrors: []Mirror{{Host: mirrorHost, Port: u.port, Path: "/debian/"}},
		Dir:     t.TempDir(),
		Lookup: func(ctx context.Context, host string) ([]netip.Addr, error) {
			if host == mirrorHost || host == "elsewhere.test" {
				return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
			}
			return nil, fmt.Errorf("no such host %s", host)
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// guest is an HTTP client whose every connection goes to one listener,
// as the DNAT rule sends a guest's connections to the mirror.
func guest(l *Listener) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableCompression: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp4", l.Addr().String())
		},
	}}
}

func serve(t *testing.T, p *Proxy, scope string) *Listener {
	l, err := p.Serve(context.Background(), ServeConfig{ID: "t", Listen: "127.0.0.1:0", Scope: scope, Client: netip.MustParseAddr("127.0.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func get(t *testing.T, c *http.Client, url string) (int, []byte) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

const (
	scopeA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	scopeB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// TestCachePerAccount: a pool file is fetched once per account and then
// served from that account's cache; another account's first request
// fetches it again (no hit on A's cache); InRelease always passes through.
func TestCachePerAccount(t *testing.T) {
	u := newUpstream(t)
	deb := bytes.Repeat([]byte("deb!"), 5000)
	u.put("/debian/pool/main/h/hello_1_amd64.deb", deb)
	u.put("/debian/dists/bookworm/InRelease", []byte("signed"))
	p := newProxy(t, u, nil)
	a, b := guest(serve(t, p, scopeA)), guest(serve(t, p, scopeB))
	base := u.url("/debian/")
	for i := 0; i < 3; i++ {
		code, body := get(t, a, base+"pool/main/h/hello_1_amd64.deb")
		if code != 200 || !bytes.Equal(body, deb) {
			t.Fatalf("A get %d: %d, %d bytes", i, code, len(body))
		}
	}
	if n := u.hits("/debian/pool/main/h/hello_1_amd64.deb"); n != 1 {
		t.Fatalf("upstream fetched the file %d times for one account, want 1", n)
	}
	if h, f := p.Stats(scopeA).Hits.Load(), p.Stats(scopeA).Fetches.Load(); h != 2 || f != 1 {
		t.Errorf("A: %d hits, %d fetches; want 2, 1", h, f)
	}
	code, body := get(t, b, base+"pool/main/h/hello_1_amd64.deb")
	if code != 200 || !bytes.Equal(body, deb) {
		t.Fatalf("B get: %d", code)
	}
	if n := u.hits("/debian/pool/main/h/hello_1_amd64.deb"); n != 2 {
		t.Errorf("B's first request was served from A's cache (upstream fetches %d, want 2)", n)
	}
	if h := p.Stats(scopeB).Hits.Load(); h != 0 {
		t.Errorf("B had %d cache hits, want 0", h)
	}
	for i := 0; i < 2; i++ {
		if code, body := get(t, a, base+"dists/bookworm/InRelease"); code != 200 || string(body) != "signed" {
			t.Fatalf("InRelease: %d %q", code, body)
		}
	}
	if n := u.hits("/debian/dists/bookworm/InRelease"); n != 2 {
		t.Errorf("InRelease fetched %d times, want 2 (passed through)", n)
	}
	// HEAD of a cached file is answered from the cache.
	resp, err := a.Head(base + "pool/main/h/hello_1_amd64.deb")
	if err != nil || resp.StatusCode != 200 || resp.ContentLength != int64(len(deb)) {
		t.Fatalf("HEAD: %v %v", resp, err)
	}
	// Each account's files are under its own scope folder only.
	for _, s := range []string{scopeA, scopeB} {
		if n := countFiles(t, filepath.Join(p.cfg.Dir, "accounts", s)); n != 1 {
			t.Errorf("scope %s holds %d files, want 1", s, n)
		}
	}
}

func countFiles(t *testing.T, dir string) int {
	n := 0
	filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// TestByHashChecked: an index named by its SHA-256 is cached only when
// its content has that digest.
func TestByHashChecked(t *testing.T) {
	u := newUpstream(t)
	good := []byte("Packages.xz content")
	sum := sha256.Sum256(good)
	goodPath := "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/" + hex.EncodeToString(sum[:])
	badPath := "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/" + strings.Repeat("0", 64)
	u.put(goodPath, good)
	u.put(badPath, []byte("not what the name says"))
	p := newProxy(t, u, nil)
	c := guest(serve(t, p, scopeA))
	for i := 0; i < 2; i++ {
		get(t, c, u.url(goodPath))
		get(t, c, u.url(badPath))
	}
	if n := u.hits(goodPath); n != 1 {
		t.Errorf("good by-hash file fetched %d times, want 1", n)
	}
	if n := u.hits(badPath); n != 2 {
		t.Errorf("mismatching by-hash file fetched %d times, want 2 (never cached)", n)
	}
}

// TestRefused: what a guest may not make the proxy do.
func TestRefused(t *testing.T) {
	u := newUpstream(t)
	u.put("/debian/pool/main/h/hello_1_amd64.deb", []byte("deb"))
	u.put("/secret", []byte("secret"))
	p := newProxy(t, u, nil)
	l := serve(t, p, scopeA)
	c := guest(l)
	base := u.url("")
	tests := []struct {
		name, method, url, body string
		want                    int
	}{
		{"POST", "POST", base + "/debian/pool/main/h/hello_1_amd64.deb", "x", 405},
		{"PUT", "PUT", base + "/debian/pool/main/h/hello_1_amd64.deb", "", 405},
		{"other host", "GET", "http://other.test/debian/pool/main/h/hello_1_amd64.deb", "", 403},
		{"outside the archive", "GET", base + "/secret", "", 403},
		{"not dists or pool", "GET", base + "/debian/project/trace", "", 403},
		{"query", "GET", base + "/debian/pool/main/h/hello_1_amd64.deb?x=1", "", 400},
		{"encoded slash", "GET", base + "/debian/pool/..%2f..%2fsecret", "", 400},
		{"redirect to another host", "GET", base + "/debian/pool/main/r/redirect_1_all.deb", "", 502},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, tc.url, strings.NewReader(tc.body))
			if tc.body == "" {
				req.Body = nil
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
	if n := u.hits("/secret"); n != 0 {
		t.Errorf("the proxy fetched a path outside the archive")
	}
	// Raw requests Go's client would not send: dot segments.
	hostHeader := fmt.Sprintf("%s:%d", mirrorHost, u.port)
	for _, raw := range []string{
		"GET /debian/pool/../../secret HTTP/1.1\r\nHost: " + hostHeader + "\r\n\r\n",
		"GET /debian//pool/x.deb HTTP/1.1\r\nHost: " + hostHeader + "\r\n\r\n",
	} {
		conn, err := net.Dial("tcp4", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, raw)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		conn.Close()
		if err != nil || resp.StatusCode != 400 {
			t.Errorf("%q: %v %v, want 400", raw, resp, err)
		}
	}
	// Another source address than the guest's is not served.
	p2 := newProxy(t, u, nil)
	l2, err := p2.Serve(context.Background(), ServeConfig{Listen: "127.0.0.1:0", Scope: scopeA, Client: netip.MustParseAddr("127.0.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if code, _ := get(t, guest(l2), base+"/debian/pool/main/h/hello_1_amd64.deb"); code != 403 {
		t.Errorf("another source got %d, want 403", code)
	}
}

// TestLimits: files over the size limit are not served whole nor
// cached; the account's cache is trimmed, least recently used first.
func TestLimits(t *testing.T) {
	u := newUpstream(t)
	for _, n := range []string{"a", "b", "c"} {
		u.put("/debian/pool/main/x/"+n+".deb", bytes.Repeat([]byte(n), 400))
	}
	u.put("/debian/pool/main/x/big.deb", bytes.Repeat([]byte("B"), 2000))
	p := newProxy(t, u, func(c *Config) { c.AccountBytes = 1000; c.FileBytes = 1000 })
	c := guest(serve(t, p, scopeA))
	base := u.url("/debian/pool/main/x/")
	if code, _ := get(t, c, base+"big.deb"); code != http.StatusBadGateway {
		t.Errorf("file over the limit: %d, want 502", code)
	}
	get(t, c, base+"a.deb")
	time.Sleep(20 * time.Millisecond)
	get(t, c, base+"b.deb")
	time.Sleep(20 * time.Millisecond)
	get(t, c, base+"a.deb") // a is now the most recently used
	time.Sleep(20 * time.Millisecond)
	get(t, c, base+"c.deb") // 1200 > 1000: b goes
	if n := countFiles(t, filepath.Join(p.cfg.Dir, "accounts", scopeA)); n != 2 {
		t.Errorf("cache holds %d files, want 2", n)
	}
	before := u.hits("/debian/pool/main/x/a.deb")
	get(t, c, base+"a.deb")
	get(t, c, base+"b.deb")
	if u.hits("/debian/pool/main/x/a.deb") != before {
		t.Error("the recently used file was evicted")
	}
	if u.hits("/debian/pool/main/x/b.deb") != 2 {
		t.Error("the least recently used file was not evicted")
	}
}

func TestParseMirror(t *testing.T) {
	tests := []struct {
		in   string
		want Mirror
		ok   bool
	}{
		{"http://Mirror.Example/debian", Mirror{Host: "mirror.example", Port: 80, Path: "/debian/"}, true},
		{"http://mirror.example:8080/", Mirror{Host: "mirror.example", Port: 8080, Path: "/"}, true},
		{"http://10.0.0.5/debian-security/", Mirror{Host: "10.0.0.5", Port: 80, Path: "/debian-security/"}, true},
		{"https://mirror.example/debian", Mirror{}, false},
		{"http://user@mirror.example/debian", Mirror{}, false},
		{"http://mirror.example/debian?x", Mirror{}, false},
		{"ftp://mirror.example/debian", Mirror{}, false},
	}
	for _, tc := range tests {
		got, err := ParseMirror(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseMirror(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

// TestHostMirrors reads one-line and deb822 sources, skips https.
func TestHostMirrors(t *testing.T) {
	etc := t.TempDir()
	os.MkdirAll(filepath.Join(etc, "sources.list.d"), 0o755)
	os.WriteFile(filepath.Join(etc, "sources.list"), []byte("deb http://one.example/debian bookworm main\ndeb https://tls.example/apt stable main\n"), 0o644)
	os.WriteFile(filepath.Join(etc, "sources.list.d", "x.sources"), []byte("Types: deb\nURIs: http://two.example/debian-security\nSuites: bookworm-security\nComponents: main\n"), 0o644)
	ms, err := HostMirrors(etc, []string{"http://three.example:8000/debian"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range ms {
		got = append(got, m.String())
	}
	want := "http://two.example:80/debian-security/ http://one.example:80/debian/ http://three.example:8000/debian/"
	if strings.Join(got, " ") != want {
		t.Errorf("mirrors = %v, want %s", got, want)
	}
	if _, err := HostMirrors(t.TempDir(), nil); err == nil {
		t.Error("no mirror at all: no error")
	}
}

// FuzzParseTarget feeds raw requests, as a guest may send them, through
// Go's request parser and the proxy's own checks: never a panic, and an
// accepted request is always a GET/HEAD of dists/ or pool/ below a
// configured mirror, with no dot segment.
func FuzzParseTarget(f *testing.F) {
	mirrors := []Mirror{{Host: "mirror.test", Port: 80, Path: "/debian/"}, {Host: "mirror.test", Port: 80, Path: "/debian-security/"}, {Host: "root.test", Port: 8080, Path: "/"}}
	for _, s := range []string{
		"GET /debian/pool/main/h/hello/hello_2.10-3_amd64.deb HTTP/1.1\r\nHost: mirror.test\r\n\r\n",
		"GET /debian/dists/bookworm/InRelease HTTP/1.1\r\nHost: MIRROR.test.\r\n\r\n",
		"HEAD /debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/9e0b5aabb2465b3d2e7a7fe27f9913846277833f7a2826e7767acccff5b588c5 HTTP/1.1\r\nHost: mirror.test:80\r\n\r\n",
		"GET http://root.test:8080/pool/x.deb HTTP/1.1\r\nHost: root.test:8080\r\n\r\n",
		"GET /debian/pool/../../etc/passwd HTTP/1.1\r\nHost: mirror.test\r\n\r\n",
		"GET /debian/pool/%2e%2e/x HTTP/1.1\r\nHost: mirror.test\r\n\r\n",
		"POST /debian/pool/x HTTP/1.1\r\nHost: mirror.test\r\nContent-Length: 3\r\n\r\nabc",
		"GET /debian-security/dists/x HTTP/1.0\r\n\r\n",
		"GET /debian/pool/a%3ab_1.deb HTTP/1.1\r\nHost: mirror.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		bodyLen := req.ContentLength
		if len(req.TransferEncoding) > 0 {
			bodyLen = -1
		}
		tg, err := parseTarget(mirrors, req.Method, req.Host, req.RequestURI, bodyLen)
		if err != nil {
			if _, ok := err.(*refusal); !ok {
				t.Fatalf("error %v is not a refusal", err)
			}
			return
		}
		if req.Method != "GET" && req.Method != "HEAD" {
			t.Fatalf("accepted method %q", req.Method)
		}
		if bodyLen != 0 {
			t.Fatal("accepted a body")
		}
		if !strings.HasPrefix(tg.path, tg.mirror.Path) || !validPath(tg.path) {
			t.Fatalf("accepted path %q for %+v", tg.path, tg.mirror)
		}
		if !strings.HasPrefix(tg.rel, "dists/") && !strings.HasPrefix(tg.rel, "pool/") {
			t.Fatalf("accepted rel %q", tg.rel)
		}
		for _, seg := range strings.Split(tg.path, "/") {
			if seg == ".." || seg == "." || strings.Contains(strings.ToLower(seg), "%2e") || strings.Contains(strings.ToLower(seg), "%2f") {
				t.Fatalf("accepted segment %q", seg)
			}
		}
		if tg.sha256 != "" && (len(tg.sha256) != 64 || !tg.immutable) {
			t.Fatalf("bad digest %q", tg.sha256)
		}
	})
}

// TestConditionalIndex: apt's If-Modified-Since for an index it holds
// reaches the mirror, and the mirror's 304 reaches apt (so apt keeps its
// InRelease and does not rebuild its caches); a malformed date is not
// passed on, and a pool file is fetched whole and cached whatever the
// guest sent.
func TestConditionalIndex(t *testing.T) {
	u := newUpstream(t)
	u.put("/debian/dists/bookworm/InRelease", []byte("signed"))
	u.put("/debian/pool/main/h/hello_1_amd64.deb", []byte("deb"))
	p := newProxy(t, u, nil)
	c := guest(serve(t, p, scopeA))
	do := func(path, ims string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", u.url(path), nil)
		if ims != "" {
			req.Header.Set("If-Modified-Since", ims)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	tests := []struct {
		name, path, ims string
		code            int
		body            string
	}{
		{"unchanged index: 304", "/debian/dists/bookworm/InRelease", upstreamModTime.Format(http.TimeFormat), 304, ""},
		{"index changed since: 200", "/debian/dists/bookworm/InRelease", upstreamModTime.Add(-time.Hour).Format(http.TimeFormat), 200, "signed"},
		{"malformed date not passed on", "/debian/dists/bookworm/InRelease", "yesterday", 200, "signed"},
		{"pool file fetched whole", "/debian/pool/main/h/hello_1_amd64.deb", upstreamModTime.Format(http.TimeFormat), 200, "deb"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if code, body := do(tc.path, tc.ims); code != tc.code || body != tc.body {
				t.Fatalf("got %d %q, want %d %q", code, body, tc.code, tc.body)
			}
		})
	}
	if st := p.Stats(scopeA); st.Fetches.Load() != 1 {
		t.Errorf("pool file fetched into the cache %d times, want 1", st.Fetches.Load())
	}
}

// TestIndexValidator: behind a mirror that ignores If-Modified-Since and
// sends no Last-Modified, an unchanged InRelease is still a 304 to a guest
// holding it, and a changed one is a 200 with a later date.
func TestIndexValidator(t *testing.T) {
	u := newUpstream(t)
	u.plain = true
	const path = "/debian/dists/bookworm/InRelease"
	u.put(path, []byte("signed v1"))
	p := newProxy(t, u, nil)
	c := guest(serve(t, p, scopeA))
	get := func(ims string) (int, string, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", u.url(path), nil)
		if ims != "" {
			req.Header.Set("If-Modified-Since", ims)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header.Get("Last-Modified")
	}
	code, body, lm := get("")
	if code != 200 || body != "signed v1" || lm == "" {
		t.Fatalf("first fetch: %d %q Last-Modified %q", code, body, lm)
	}
	if code, body, _ := get(lm); code != 304 || body != "" {
		t.Fatalf("unchanged index asked with its date: %d %q, want 304", code, body)
	}
	u.put(path, []byte("signed v2"))
	code, body, lm2 := get(lm)
	if code != 200 || body != "signed v2" {
		t.Fatalf("changed index asked with the old date: %d %q, want 200 with v2", code, body)
	}
	if t1, _ := http.ParseTime(lm); lm2 == lm || !mustTime(t, lm2).After(t1) {
		t.Fatalf("changed index dated %q, not after %q", lm2, lm)
	}
	if code, _, _ := get(lm2); code != 304 {
		t.Fatalf("v2 asked with its own date: %d, want 304", code)
	}
	if code, _, _ := get("garbage"); code != 200 {
		t.Fatalf("malformed If-Modified-Since: %d, want 200", code)
	}
}

func mustTime(t *testing.T, s string) time.Time {
	t.Helper()
	tm, err := http.ParseTime(s)
	if err != nil {
		t.Fatal(err)
	}
	return tm
}
