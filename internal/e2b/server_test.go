package e2b

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	lc "github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// env is the E2B API over a real SQLite store and the API server, with
// kiln's fake backend in place of the VM engine (the VM path is
// test/e2b's).
type env struct {
	t        *testing.T
	st       *sqlite.Store
	srv      *Server
	api      *api.Server
	url      string
	key      string // an E2B key of account
	account  string
	otherKey string // an E2B key of another account
	tokens   *EnvdTokens
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
	e := &env{t: t, st: st, tokens: NewEnvdTokens([]byte("k"))}
	e.account, _ = auth.NewAccountID()
	other, _ := auth.NewAccountID()
	for _, k := range []struct {
		key     *string
		account string
	}{{&e.key, e.account}, {&e.otherKey, other}} {
		key, hash, err := NewAPIKey()
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CreateE2BKey(ctx, store.E2BKey{Hash: hash, Account: k.account, Prefix: KeyPrefixOf(key), CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
		*k.key = key
	}
	be := fakebackend.New(lc.NewReporter(st), 0)
	t.Cleanup(be.Wait)
	e.api = api.NewServer(api.Config{OperatorAccounts: []string{e.account}}, st, be)
	e.srv = New(Config{API: e.api, Store: st, Sandboxes: st, Tokens: e.tokens, Domain: "microvm.localhost:8443",
		Egress: "arn:aws:lambda:us-east-1:aws:network-connector:" + api.InternetEgressConnector, WaitTimeout: 10 * time.Second})
	hs := httptest.NewServer(e.srv.Handler())
	t.Cleanup(hs.Close)
	e.url = hs.URL

	// A template: a kiln image of the account, built by the fake backend.
	code := filepath.Join(dir, "code.zip")
	os.WriteFile(code, []byte("PK\x05\x06"+strings.Repeat("\x00", 18)), 0o600)
	principal := store.AccessKey{ID: "test", Account: e.account}
	img := map[string]any{"name": "tmpl", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]string{"uri": "file://" + code}}
	if err := e.srv.op(ctx, principal, "POST", "/microvm-images", nil, img, nil); err != nil {
		t.Fatalf("creating the template image: %v", err)
	}
	for end := time.Now().Add(10 * time.Second); ; {
		var out struct{ State string }
		if err := e.srv.op(ctx, principal, "GET", "/microvm-images/tmpl", nil, nil, &out); err != nil {
			t.Fatal(err)
		}
		if out.State == "CREATED" {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("image is %s", out.State)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return e
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a answer) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(a.body, v); err != nil {
		t.Fatalf("answer %d %q: %v", a.status, a.body, err)
	}
}

func (e *env) do(key, method, path string, body any) answer {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, e.url+path, rd)
	if key != "" {
		req.Header.Set("X-API-Key", key)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, b}
}

// create makes a sandbox and returns its id.
func (e *env) create(body map[string]any) string {
	e.t.Helper()
	a := e.do(e.key, "POST", "/v2/sandboxes", body)
	e.want(a, 201, "create")
	var sb sandboxOut
	a.json(e.t, &sb)
	return sb.SandboxID
}

func (e *env) want(a answer, status int, what string) {
	e.t.Helper()
	if a.status != status {
		e.t.Fatalf("%s: %d %s, want %d", what, a.status, a.body, status)
	}
	if status >= 400 {
		var er apiError
		if json.Unmarshal(a.body, &er) != nil || er.Code != status || er.Message == "" {
			e.t.Fatalf("%s: error body %s is not E2B's {code, message}", what, a.body)
		}
	}
}

// TestSandboxLifecycle drives every route kiln implements the way the SDK
// calls them, and checks the sandbox is a microVM of the key's account.
func TestSandboxLifecycle(t *testing.T) {
	e := newEnv(t)
	e.want(e.do("", "GET", "/v2/sandboxes", nil), 401, "no key")
	e.want(e.do("e2b_0000000000000000000000000000000000000000", "GET", "/v2/sandboxes", nil), 401, "unknown key")
	e.want(e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "nope"}), 404, "unknown template")
	e.want(e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "autoResume": map[string]any{"enabled": true}}), 400, "autoResume without autoPause")
	e.want(e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "autoPause": true, "autoPauseMemory": false}), 400, "autoPause without memory")
	e.want(e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "envVars": map[string]string{"A=B": "x"}}), 400, "bad env name")

	var ids []string
	for i := range 3 {
		a := e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "tmpl", "timeout": 300,
			"metadata": map[string]string{"n": fmt.Sprint(i), "kind": map[bool]string{true: "even", false: "odd"}[i%2 == 0]},
			"envVars":  map[string]string{"GREETING": "hi"}})
		e.want(a, 201, "create")
		var sb sandboxOut
		a.json(t, &sb)
		if sb.SandboxID == "" || sb.TemplateID != "tmpl" || sb.EnvdVersion != EnvdVersion || sb.Domain != "microvm.localhost:8443" ||
			!e.tokens.Valid(sb.EnvdAccessToken, e.account, sb.SandboxID) {
			t.Fatalf("create answered %+v", sb)
		}
		ids = append(ids, sb.SandboxID)
	}

	// Each sandbox is a RUNNING microVM of the same account.
	var mv struct {
		Items []struct{ MicrovmID, State string }
	}
	if err := e.srv.op(context.Background(), store.AccessKey{ID: "t", Account: e.account}, "GET", "/microvms", nil, nil, &mv); err != nil {
		t.Fatal(err)
	}
	if len(mv.Items) != 3 {
		t.Fatalf("ListMicrovms of the account: %+v", mv.Items)
	}
	for _, it := range mv.Items {
		if it.State != "RUNNING" {
			t.Fatalf("microVM %s is %s", it.MicrovmID, it.State)
		}
	}

	var d sandboxDetail
	a := e.do(e.key, "GET", "/sandboxes/"+ids[0], nil)
	e.want(a, 200, "get")
	a.json(t, &d)
	if d.State != "running" || d.Metadata["n"] != "0" || d.CPUCount < 1 || d.MemoryMB <= 0 {
		t.Fatalf("get answered %+v", d)
	}
	e.want(e.do(e.otherKey, "GET", "/sandboxes/"+ids[0], nil), 404, "another account's sandbox")
	e.want(e.do(e.otherKey, "DELETE", "/sandboxes/"+ids[0], nil), 404, "killing another account's sandbox")

	// List: metadata filter, pages of one with x-next-token.
	md := url.QueryEscape(url.Values{"kind": {"even"}}.Encode())
	var got []string
	next := ""
	for page := 0; page < 5; page++ {
		p := "/v2/sandboxes?limit=1&metadata=" + md
		if next != "" {
			p += "&nextToken=" + next
		}
		a := e.do(e.key, "GET", p, nil)
		e.want(a, 200, "list")
		var items []listedSandbox
		a.json(t, &items)
		for _, it := range items {
			got = append(got, it.SandboxID)
		}
		if next = a.header.Get("X-Next-Token"); next == "" {
			break
		}
	}
	if strings.Join(got, ",") != ids[0]+","+ids[2] {
		t.Fatalf("listing kind=even in pages of one gave %v, want %v", got, []string{ids[0], ids[2]})
	}
	var others []listedSandbox
	e.do(e.otherKey, "GET", "/v2/sandboxes", nil).json(t, &others)
	if len(others) != 0 {
		t.Fatalf("another account lists %v", others)
	}

	// setTimeout moves the microVM's deadline.
	e.want(e.do(e.key, "POST", "/sandboxes/"+ids[1]+"/timeout", map[string]any{"timeout": 42}), 204, "setTimeout")
	m, err := e.st.GetMicrovm(context.Background(), e.account, ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if left := time.Until(m.DeadlineAt); left < 30*time.Second || left > 43*time.Second {
		t.Fatalf("deadline %v from now, want about 42s", left)
	}
	e.want(e.do(e.key, "POST", "/sandboxes/"+ids[1]+"/timeout", map[string]any{"timeout": MaxTimeout + 1}), 400, "timeout too long")

	// Pause, pause again (409: the SDK's "already paused"), connect.
	e.want(e.do(e.key, "POST", "/sandboxes/"+ids[1]+"/pause", map[string]any{}), 204, "pause")
	e.do(e.key, "GET", "/sandboxes/"+ids[1], nil).json(t, &d)
	if d.State != "paused" {
		t.Fatalf("after pause: %s", d.State)
	}
	e.want(e.do(e.key, "POST", "/sandboxes/"+ids[1]+"/pause", map[string]any{}), 409, "pause a paused sandbox")
	var paused []listedSandbox
	e.do(e.key, "GET", "/v2/sandboxes?state=paused", nil).json(t, &paused)
	if len(paused) != 1 || paused[0].SandboxID != ids[1] {
		t.Fatalf("paused sandboxes: %+v", paused)
	}
	e.want(e.do(e.key, "POST", "/v2/sandboxes/"+ids[1]+"/connect", map[string]any{"timeout": 60}), 201, "connect a paused sandbox")
	e.want(e.do(e.key, "POST", "/v2/sandboxes/"+ids[1]+"/connect", map[string]any{}), 200, "connect a running sandbox")

	// Kill: gone for the SDK, TERMINATED for the AWS API.
	e.want(e.do(e.key, "DELETE", "/sandboxes/"+ids[0], nil), 204, "kill")
	if m, err := e.srv.waitFor(context.Background(), e.account, ids[0], store.StateTerminated); err != nil || m.StateReason != "UserRequested: TerminateMicrovm" {
		t.Fatalf("killed sandbox's microVM: %+v, %v", m, err)
	}
	e.want(e.do(e.key, "GET", "/sandboxes/"+ids[0], nil), 404, "get a killed sandbox")
	e.want(e.do(e.key, "DELETE", "/sandboxes/"+ids[0], nil), 404, "kill a killed sandbox")
	e.want(e.do(e.key, "POST", "/v2/sandboxes/"+ids[0]+"/connect", map[string]any{}), 404, "connect a killed sandbox")
	e.want(e.do(e.key, "GET", "/volumes", nil), 501, "a route kiln does not implement")
}

// TestTimeoutActions checks what a passing timeout does: a sandbox is
// killed, one created with autoPause is paused (and connect resumes it
// with a new timeout), and a paused sandbox is not killed by the timeout
// it had while running.
func TestTimeoutActions(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	create := e.create
	kill := create(map[string]any{"templateID": "tmpl", "timeout": 300})
	pause := create(map[string]any{"templateID": "tmpl", "timeout": 300, "autoPause": true})
	paused := create(map[string]any{"templateID": "tmpl", "timeout": 300})
	var d sandboxDetail
	e.do(e.key, "GET", "/sandboxes/"+pause, nil).json(t, &d)
	if d.Lifecycle != (lifecycle{OnTimeout: "pause"}) {
		t.Fatalf("lifecycle of an autoPause sandbox: %+v", d.Lifecycle)
	}
	e.want(e.do(e.key, "POST", "/sandboxes/"+paused+"/pause", nil), 204, "pause")

	// Every timeout ends now; the API's deadline controller runs.
	for _, id := range []string{kill, pause} {
		e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/timeout", map[string]any{"timeout": 0}), 204, "setTimeout 0")
	}
	if m, _ := e.st.GetMicrovm(ctx, e.account, paused); time.Until(m.DeadlineAt) < 7*time.Hour {
		t.Fatalf("a paused sandbox ends in %v: its running timeout still counts", time.Until(m.DeadlineAt))
	}
	time.Sleep(10 * time.Millisecond)
	e.api.Lifecycle().ReapOnce(ctx)
	if m, err := e.srv.waitFor(ctx, e.account, kill, store.StateTerminated); err != nil || !strings.HasPrefix(m.StateReason, "MaximumDurationExceeded") {
		t.Fatalf("sandbox past its timeout: %+v, %v", m.State, err)
	}
	e.want(e.do(e.key, "GET", "/sandboxes/"+kill, nil), 404, "get a sandbox past its timeout")
	m, err := e.srv.waitFor(ctx, e.account, pause, store.StateSuspended)
	if err != nil || !strings.HasPrefix(m.StateReason, "DeadlineSuspended") || time.Until(m.DeadlineAt) < 7*time.Hour {
		t.Fatalf("autoPause sandbox past its timeout: %s %q ends in %v, %v", m.State, m.StateReason, time.Until(m.DeadlineAt), err)
	}
	e.api.Lifecycle().ReapOnce(ctx) // not due any more: stays paused
	e.do(e.key, "GET", "/sandboxes/"+pause, nil).json(t, &d)
	if d.State != "paused" {
		t.Fatalf("auto-paused sandbox is %s", d.State)
	}
	e.want(e.do(e.key, "POST", "/v2/sandboxes/"+pause+"/connect", map[string]any{}), 201, "connect an auto-paused sandbox")
	m, _ = e.st.GetMicrovm(ctx, e.account, pause)
	if left := time.Until(m.DeadlineAt); m.State != store.StateRunning || left < 250*time.Second || left > 301*time.Second {
		t.Fatalf("resumed sandbox is %s and ends in %v, want RUNNING and E2B's default 300s", m.State, left)
	}
	e.want(e.do(e.key, "POST", "/sandboxes/"+pause+"/pause", nil), 204, "pause the resumed sandbox")
}

func FuzzParseNewSandbox(f *testing.F) {
	f.Add([]byte(`{"templateID":"base","timeout":300,"metadata":{"a":"b"},"envVars":{"X":"1"}}`))
	f.Add([]byte(`{"templateID":"","network":{"allowOut":["1.1.1.1"]}}`))
	f.Add([]byte(`{"templateID":"t","envVars":{"1A":"x"},"timeout":-1}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		in, err := parseNewSandbox(body)
		if err != nil {
			return
		}
		if in.TemplateID == "" || len(in.TemplateID) > maxTemplateID || len(in.Metadata) > maxMetadata || len(in.EnvVars) > maxEnvVars {
			t.Fatalf("accepted %+v", in)
		}
		if in.Timeout != nil && (*in.Timeout < 1 || *in.Timeout > MaxTimeout) {
			t.Fatalf("accepted timeout %d", *in.Timeout)
		}
		for k, v := range in.EnvVars {
			if !validEnvName(k) || strings.ContainsRune(v, 0) {
				t.Fatalf("accepted env %q=%q", k, v)
			}
		}
	})
}

func FuzzParseListQuery(f *testing.F) {
	f.Add("metadata=" + url.QueryEscape("a=b&c=d") + "&state=running,paused&limit=5&nextToken=mvm-0a")
	f.Add("metadata=%zz&limit=0")
	f.Add("state=dead&nextToken=../x")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		lq, err := parseListQuery(q)
		if err != nil {
			return
		}
		if lq.limit < 1 || lq.limit > 100 || len(lq.metadata) > maxMetadata || (lq.after != "" && !validSandboxID(lq.after)) {
			t.Fatalf("accepted %+v", lq)
		}
		for _, s := range lq.states {
			if s != "running" && s != "paused" {
				t.Fatalf("accepted state %q", s)
			}
		}
	})
}
