package console

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

type env struct {
	t        *testing.T
	url      string
	st       store.Store
	operator store.AccessKey
	tenant   store.AccessKey
	code     string // a zip the operator may build from
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := &env{t: t, st: st}
	for _, k := range []*store.AccessKey{&e.operator, &e.tenant} {
		acct, _ := auth.NewAccountID()
		if *k, err = auth.NewAccessKey(acct, ""); err != nil {
			t.Fatal(err)
		}
		if err := st.CreateAccessKey(ctx, *k); err != nil {
			t.Fatal(err)
		}
	}
	e.code = filepath.Join(dir, "code.zip")
	os.WriteFile(e.code, []byte("PK\x05\x06"+strings.Repeat("\x00", 18)), 0o600)
	rep := lifecycle.NewReporter(st)
	be := fakebackend.New(rep, 0)
	srv := api.NewServer(api.Config{ArtifactDir: filepath.Join(dir, "artifacts"), OperatorAccounts: []string{e.operator.Account}}, st, be)
	t.Cleanup(be.Wait)
	c := New(Config{API: srv, Store: st, Operators: []string{e.operator.Account}})
	mux := http.NewServeMux()
	mux.Handle(Prefix, c.Handler())
	mux.Handle("/", srv.Handler())
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	e.url = hs.URL
	return e
}

// browser is a cookie-keeping client that sends what a same-origin page
// sends.
type browser struct {
	e    *env
	c    *http.Client
	csrf string
}

func (e *env) browser() *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{e: e, c: &http.Client{Jar: jar, Timeout: 10 * time.Second}}
}

type answer struct {
	status int
	typ    string
	body   map[string]any
	resp   *http.Response
}

func (b *browser) do(method, path string, body any, hdr map[string]string) answer {
	b.e.t.Helper()
	var rd io.Reader
	if body != nil {
		j, _ := json.Marshal(body)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, b.e.url+path, rd)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", b.e.url)
	if b.csrf != "" {
		req.Header.Set(csrfHeader, b.csrf)
	}
	for k, v := range hdr {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	resp, err := b.c.Do(req)
	if err != nil {
		b.e.t.Fatal(err)
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode, typ: resp.Header.Get("x-amzn-ErrorType"), resp: resp}
	raw, _ := io.ReadAll(resp.Body)
	json.Unmarshal(raw, &a.body)
	return a
}

func (b *browser) signIn(k store.AccessKey) answer {
	b.e.t.Helper()
	a := b.do("POST", Prefix+"api/session", map[string]string{"accessKeyId": k.ID, "secretAccessKey": k.Secret}, nil)
	if a.status == 200 {
		b.csrf, _ = a.body["csrfToken"].(string)
	}
	return a
}

const v = Prefix + "api/aws/" + api.APIVersion

func TestSignInSessionCSRFAndSignOut(t *testing.T) {
	e := newEnv(t)
	b := e.browser()
	if a := b.do("GET", v+"/microvms", nil, nil); a.status != 401 {
		t.Fatalf("without a session: %d, want 401", a.status)
	}
	wrong := e.tenant
	// Another first character: the secret may begin with x itself.
	first := "x"
	if strings.HasPrefix(wrong.Secret, "x") {
		first = "y"
	}
	wrong.Secret = first + wrong.Secret[1:]
	if a := b.signIn(wrong); a.status != 403 || !strings.HasPrefix(a.typ, "AccessDeniedException") || len(a.resp.Cookies()) != 0 {
		t.Fatalf("wrong secret: %d %s cookies %v", a.status, a.typ, a.resp.Cookies())
	}
	a := b.signIn(e.tenant)
	if a.status != 200 || b.csrf == "" || a.body["account"] != e.tenant.Account || a.body["operator"] != false {
		t.Fatalf("sign-in: %d %v", a.status, a.body)
	}
	var ck *http.Cookie
	for _, c := range a.resp.Cookies() {
		if c.Name == cookieName {
			ck = c
		}
	}
	if ck == nil || !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode || ck.Path != Prefix || ck.Secure {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, Path=%s, not Secure over plain HTTP", ck, Prefix)
	}
	if a := b.do("GET", v+"/microvms", nil, nil); a.status != 200 {
		t.Fatalf("ListMicrovms with the session: %d %v", a.status, a.body)
	}
	// The API's own validation and words come through.
	a = b.do("POST", v+"/microvms", map[string]any{}, nil)
	if a.status != 400 || !strings.HasPrefix(a.typ, "ValidationException") || !strings.Contains(a.body["message"].(string), "imageIdentifier") {
		t.Fatalf("RunMicrovm without an image: %d %s %v", a.status, a.typ, a.body)
	}
	// State changes need the CSRF token and the console's own origin.
	for name, hdr := range map[string]map[string]string{
		"no token":     {csrfHeader: ""},
		"wrong token":  {csrfHeader: "x" + b.csrf},
		"other origin": {"Origin": "https://evil.example"},
	} {
		if a := b.do("POST", v+"/microvms", map[string]any{}, hdr); a.status != 403 {
			t.Errorf("%s: %d %v, want 403", name, a.status, a.body)
		}
		if a := b.do("DELETE", Prefix+"api/session", nil, hdr); a.status != 403 {
			t.Errorf("sign-out with %s: %d, want 403", name, a.status)
		}
	}
	if a := b.do("POST", Prefix+"api/session", map[string]string{"accessKeyId": e.tenant.ID, "secretAccessKey": e.tenant.Secret},
		map[string]string{"Origin": "https://evil.example"}); a.status != 403 {
		t.Errorf("sign-in from another origin: %d, want 403", a.status)
	}
	if a := b.do("DELETE", Prefix+"api/session", nil, nil); a.status != 204 {
		t.Fatalf("sign-out: %d", a.status)
	}
	if a := b.do("GET", v+"/microvms", nil, nil); a.status != 401 {
		t.Fatalf("after sign-out: %d, want 401", a.status)
	}
	// A deleted key ends its sessions at once.
	b2 := e.browser()
	b2.signIn(e.tenant)
	if err := e.st.DeleteAccessKey(context.Background(), e.tenant.ID); err != nil {
		t.Fatal(err)
	}
	if a := b2.do("GET", v+"/microvms", nil, nil); a.status != 401 {
		t.Fatalf("after the key was deleted: %d, want 401", a.status)
	}
}

func TestSecureCookieOverTLS(t *testing.T) {
	c := New(Config{TLS: true})
	if ck := c.cookie("x", time.Now().Add(time.Hour)); !ck.Secure || !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode {
		t.Fatalf("cookie over TLS: %+v", ck)
	}
}

func TestSignInThrottled(t *testing.T) {
	e := newEnv(t)
	b := e.browser()
	wrong := e.tenant
	wrong.Secret = "nope"
	for i := 0; i < 10; i++ {
		if a := b.signIn(wrong); a.status != 403 {
			t.Fatalf("attempt %d: %d", i, a.status)
		}
	}
	if a := b.signIn(e.tenant); a.status != 429 {
		t.Fatalf("after 10 failures even the right secret: %d, want 429 for a minute", a.status)
	}
}

// A tenant's session sees and touches only its own account; the operator
// sees every account and may act in one.
func TestAccountScope(t *testing.T) {
	e := newEnv(t)
	op, ten := e.browser(), e.browser()
	if a := op.signIn(e.operator); a.status != 200 || a.body["operator"] != true || len(a.body["accounts"].([]any)) != 2 {
		t.Fatalf("operator sign-in: %v", a.body)
	}
	ten.signIn(e.tenant)
	img := map[string]any{"name": "opimg", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]string{"uri": "file://" + e.code}}
	if a := op.do("POST", v+"/microvm-images", img, nil); a.status != 201 {
		t.Fatalf("operator CreateMicrovmImage: %d %v", a.status, a.body)
	}
	// The tenant may not build from a host path (the API's rule holds).
	img["name"] = "tenimg"
	if a := ten.do("POST", v+"/microvm-images", img, nil); a.status != 400 {
		t.Fatalf("tenant building from a host path: %d %v", a.status, a.body)
	}
	if a := ten.do("GET", v+"/microvm-images", nil, nil); a.status != 200 || len(a.body["items"].([]any)) != 0 {
		t.Fatalf("tenant lists images: %d %v", a.status, a.body)
	}
	if a := ten.do("GET", v+"/microvm-images/opimg", nil, nil); a.status != 404 {
		t.Fatalf("tenant reads the operator's image: %d", a.status)
	}
	if a := ten.do("DELETE", v+"/microvm-images/opimg", nil, nil); a.status != 404 {
		t.Fatalf("tenant deletes the operator's image: %d", a.status)
	}
	if a := ten.do("GET", v+"/microvm-images", nil, map[string]string{accountHeader: e.operator.Account}); a.status != 403 {
		t.Fatalf("tenant acting in the operator's account: %d", a.status)
	}
	if a := op.do("GET", v+"/microvm-images", nil, map[string]string{accountHeader: e.tenant.Account}); a.status != 200 || len(a.body["items"].([]any)) != 0 {
		t.Fatalf("operator lists the tenant's images: %d %v", a.status, a.body)
	}
	if a := op.do("GET", v+"/microvm-images", nil, map[string]string{accountHeader: "999999999999"}); a.status != 404 {
		t.Fatalf("operator in an account with no key: %d", a.status)
	}
	ua := ten.do("GET", Prefix+"api/usage", nil, nil)
	if accts := ua.body["accounts"].([]any); len(accts) != 1 || accts[0].(map[string]any)["account"] != e.tenant.Account {
		t.Fatalf("tenant usage covers %v, want only its own account", accts)
	}
	uo := op.do("GET", Prefix+"api/usage", nil, nil)
	if accts := uo.body["accounts"].([]any); len(accts) != 2 {
		t.Fatalf("operator usage covers %v, want both accounts", accts)
	}
	// Uploads through the session land in the session's own account.
	zip := []byte("PK\x05\x06" + strings.Repeat("\x00", 18))
	req, _ := http.NewRequest("PUT", e.url+v[:len(v)-len(api.APIVersion)]+"kiln/v1/code-artifacts", bytes.NewReader(zip))
	req.Header.Set(csrfHeader, ten.csrf)
	req.Header.Set("Origin", e.url)
	resp, err := ten.c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var up map[string]any
	json.NewDecoder(resp.Body).Decode(&up)
	resp.Body.Close()
	if resp.StatusCode != 201 || !strings.Contains(up["uri"].(string), "/"+e.tenant.Account+"/") {
		t.Fatalf("tenant upload: %d %v", resp.StatusCode, up)
	}
	img["codeArtifact"] = map[string]string{"uri": up["uri"].(string)}
	if a := ten.do("POST", v+"/microvm-images", img, nil); a.status != 201 {
		t.Fatalf("tenant builds from its upload: %d %v", a.status, a.body)
	}
}

// The API's session handler refuses any request whose context carries no
// principal: mounted by mistake, it is not an open door.
func TestSessionHandlerNeedsPrincipal(t *testing.T) {
	st, _ := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "k.db"))
	defer st.Close()
	srv := api.NewServer(api.Config{ArtifactDir: t.TempDir()}, st, fakebackend.New(lifecycle.NewReporter(st), 0))
	for _, r := range []*http.Request{
		httptest.NewRequest("GET", "/"+api.APIVersion+"/microvms", nil),
		httptest.NewRequest("PUT", api.ArtifactPath, strings.NewReader("PK\x05\x06")),
	} {
		w := httptest.NewRecorder()
		srv.SessionHandler().ServeHTTP(w, r)
		if w.Code != 403 {
			t.Errorf("%s %s without a principal: %d, want 403", r.Method, r.URL.Path, w.Code)
		}
	}
}

// The usage page's memory figures follow the image builder's sizes.
func TestMemorySizesMatchBuilder(t *testing.T) {
	if defaultMemoryMiB != imagebuild.DefaultMemoryMiB {
		t.Errorf("defaultMemoryMiB %d, builder's %d", defaultMemoryMiB, imagebuild.DefaultMemoryMiB)
	}
	if len(memorySizes) != len(imagebuild.MemorySizes) {
		t.Fatalf("memorySizes %v, builder's %v", memorySizes, imagebuild.MemorySizes)
	}
	for i, s := range imagebuild.MemorySizes {
		if memorySizes[i] != int64(s) {
			t.Errorf("memorySizes %v, builder's %v", memorySizes, imagebuild.MemorySizes)
		}
		if want, _ := imagebuild.MemoryFor(int64(s) - 1); memoryFor(int64(s)-1) != int64(want) {
			t.Errorf("memoryFor(%d) = %d, builder's %d", s-1, memoryFor(int64(s)-1), want)
		}
	}
}
