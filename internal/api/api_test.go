package api_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

type env struct {
	t      *testing.T
	st     *sqlite.Store
	srv    *api.Server
	be     *fakebackend.Backend
	hs     *httptest.Server
	c      *awscli.Client
	key    store.AccessKey
	offset atomic.Int64 // added to the server clock
}

func newEnv(t *testing.T, opts ...func(*api.Config)) *env {
	t.Helper()
	return newEnvBackend(t, nil, opts...)
}

// newEnvBackend is newEnv with the server's backend wrap(the fake one).
func newEnvBackend(t *testing.T, wrap func(*fakebackend.Backend) lifecycle.Backend, opts ...func(*api.Config)) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := &env{t: t, st: st}
	e.be = fakebackend.New(lifecycle.NewReporter(st), 5*time.Millisecond)
	cfg := api.Config{EndpointPort: "8443", Now: func() time.Time {
		return time.Now().Add(time.Duration(e.offset.Load()))
	}}
	for _, o := range opts {
		o(&cfg)
	}
	var be lifecycle.Backend = e.be
	if wrap != nil {
		be = wrap(e.be)
	}
	e.srv = api.NewServer(cfg, st, be)
	e.hs = httptest.NewServer(e.srv.Handler())
	t.Cleanup(func() { e.hs.Close(); e.be.Wait() })
	e.key = e.newKey("111111111111")
	e.c = e.client(e.key)
	return e
}

func (e *env) newKey(account string) store.AccessKey {
	k, err := auth.NewAccessKey(account, "test")
	if err != nil {
		e.t.Fatal(err)
	}
	if err := e.st.CreateAccessKey(context.Background(), k); err != nil {
		e.t.Fatal(err)
	}
	return k
}

func (e *env) client(k store.AccessKey) *awscli.Client {
	return awscli.NewClient(e.hs.URL, "us-east-1", auth.Credentials{AccessKeyID: k.ID, SecretAccessKey: k.Secret})
}

// do calls the API and decodes a JSON answer into a map.
func do(t *testing.T, c *awscli.Client, method, path string, q url.Values, body any) (map[string]any, error) {
	t.Helper()
	var b []byte
	if body != nil {
		var err error
		if b, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	out, err := c.Do(context.Background(), method, path, q, b)
	if err != nil {
		return nil, err
	}
	m := map[string]any{}
	if len(out) > 0 {
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatalf("decoding %s: %v", out, err)
		}
	}
	return m, nil
}

func (e *env) ok(method, path string, q url.Values, body any) map[string]any {
	e.t.Helper()
	m, err := do(e.t, e.c, method, path, q, body)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	return m
}

// fails asserts an API error of type typ whose message contains want.
func fails(t *testing.T, err error, typ, want string) {
	t.Helper()
	var ae *awscli.APIError
	if !errors.As(err, &ae) {
		t.Fatalf("want %s, got %v", typ, err)
	}
	if ae.Type != typ || !strings.Contains(ae.Message, want) {
		t.Fatalf("want %s containing %q, got %s: %s", typ, want, ae.Type, ae.Message)
	}
}

func (e *env) waitField(path, field, want string) map[string]any {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m := e.ok("GET", path, nil, nil)
		if m[field] == want {
			return m
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: %s is %v, want %s", path, field, m[field], want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

const (
	base    = "/2025-09-09"
	baseARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12"
	roleARN = "arn:aws:iam::111111111111:role/build"
)

func imageBody(name string) map[string]any {
	return map[string]any{
		"name": name, "baseImageArn": baseARN, "buildRoleArn": roleARN,
		"codeArtifact": map[string]any{"uri": "s3://kiln-test/app.zip"},
		"hooks":        map[string]any{"port": 9000, "microvmHooks": map[string]any{"run": "ENABLED", "runTimeoutInSeconds": 5}},
		"tags":         map[string]any{"team": "a"},
	}
}

// readyImage creates an image and waits for it to be CREATED.
func (e *env) readyImage(name string) map[string]any {
	e.ok("POST", base+"/microvm-images", nil, imageBody(name))
	return e.waitField(base+"/microvm-images/"+name, "state", "CREATED")
}

func (e *env) runningVM(body map[string]any) string {
	e.t.Helper()
	m := e.ok("POST", base+"/microvms", nil, body)
	id := m["microvmId"].(string)
	e.waitField(base+"/microvms/"+id, "state", "RUNNING")
	return id
}

func TestImageOperations(t *testing.T) {
	e := newEnv(t)
	created := e.ok("POST", base+"/microvm-images", nil, imageBody("app"))
	for k, want := range map[string]any{"name": "app", "state": "CREATING", "imageVersion": "1.0",
		"imageArn": "arn:aws:lambda:us-east-1:111111111111:microvm-image:app"} {
		if created[k] != want {
			t.Errorf("CreateMicrovmImage %s = %v, want %v", k, created[k], want)
		}
	}
	if _, ok := created["createdAt"].(float64); !ok {
		t.Errorf("createdAt should be epoch seconds, got %#v", created["createdAt"])
	}
	img := e.waitField(base+"/microvm-images/app", "state", "CREATED")
	if img["latestActiveImageVersion"] != "1.0" || img["tags"].(map[string]any)["team"] != "a" {
		t.Errorf("GetMicrovmImage = %v", img)
	}
	// By ARN too.
	e.ok("GET", base+"/microvm-images/"+url.PathEscape(created["imageArn"].(string)), nil, nil)

	list := e.ok("GET", base+"/microvm-images", url.Values{"nameFilter": {"ap"}}, nil)
	if items := list["items"].([]any); len(items) != 1 {
		t.Errorf("ListMicrovmImages = %v", list)
	}
	v := e.ok("GET", base+"/microvm-images/app/versions/1", nil, nil)
	if v["state"] != "SUCCESSFUL" || v["status"] != "ACTIVE" || v["baseImageArn"] != baseARN {
		t.Errorf("GetMicrovmImageVersion = %v", v)
	}
	builds := e.ok("GET", base+"/microvm-images/app/versions/1/builds", nil, nil)["items"].([]any)
	if len(builds) != 1 {
		t.Fatalf("ListMicrovmImageBuilds = %v", builds)
	}
	bid := builds[0].(map[string]any)["buildId"].(string)
	b := e.ok("GET", base+"/microvm-images/app/versions/1/builds/"+bid, nil, nil)
	if b["buildState"] != "SUCCESSFUL" || b["snapshotBuild"] == nil {
		t.Errorf("GetMicrovmImageBuild = %v", b)
	}
	logs := e.ok("GET", "/kiln/v1/microvm-images/app/versions/1/builds/"+bid+"/log", nil, nil)
	if !strings.Contains(logs["log"].(string), "fake build") {
		t.Errorf("build log = %v", logs)
	}

	upd := imageBody("")
	delete(upd, "name")
	delete(upd, "tags")
	upd["description"] = "second"
	u := e.ok("PUT", base+"/microvm-images/app", nil, upd)
	if u["imageVersion"] != "2.0" || u["state"] != "UPDATING" {
		t.Errorf("UpdateMicrovmImage = %v", u)
	}
	e.waitField(base+"/microvm-images/app", "state", "UPDATED")
	vs := e.ok("GET", base+"/microvm-images/app/versions", url.Values{"maxResults": {"1"}}, nil)
	if len(vs["items"].([]any)) != 1 || vs["nextToken"] == nil {
		t.Errorf("ListMicrovmImageVersions page 1 = %v", vs)
	}
	vs = e.ok("GET", base+"/microvm-images/app/versions", url.Values{"maxResults": {"1"}, "nextToken": {vs["nextToken"].(string)}}, nil)
	if it := vs["items"].([]any); len(it) != 1 || it[0].(map[string]any)["imageVersion"] != "2.0" || vs["nextToken"] != nil {
		t.Errorf("ListMicrovmImageVersions page 2 = %v", vs)
	}

	iv := e.ok("PATCH", base+"/microvm-images/app/versions/2.0", nil, map[string]any{"status": "INACTIVE"})
	if iv["status"] != "INACTIVE" {
		t.Errorf("UpdateMicrovmImageVersion = %v", iv)
	}
	if img := e.ok("GET", base+"/microvm-images/app", nil, nil); img["latestActiveImageVersion"] != "1.0" {
		t.Errorf("latest active after deactivating 2 = %v", img["latestActiveImageVersion"])
	}
	_, err := do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app", "imageVersion": "2"})
	fails(t, err, "ConflictException", "INACTIVE")

	d := e.ok("DELETE", base+"/microvm-images/app/versions/2", nil, nil)
	if d["state"] != "DELETED" || d["imageVersion"] != "2.0" {
		t.Errorf("DeleteMicrovmImageVersion = %v", d)
	}
	d = e.ok("DELETE", base+"/microvm-images/app", nil, nil)
	if d["state"] != "DELETED" {
		t.Errorf("DeleteMicrovmImage = %v", d)
	}
	_, err = do(t, e.c, "GET", base+"/microvm-images/app", nil, nil)
	fails(t, err, "ResourceNotFoundException", "app")

	// A failing build.
	fb := imageBody("broken")
	fb["codeArtifact"] = map[string]any{"uri": "s3://kiln-test/fail.zip"}
	e.ok("POST", base+"/microvm-images", nil, fb)
	img = e.waitField(base+"/microvm-images/broken", "state", "CREATE_FAILED")
	if img["latestFailedImageVersion"] != "1.0" {
		t.Errorf("failed image = %v", img)
	}
	_, err = do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "broken"})
	fails(t, err, "ConflictException", "no successfully built version")
}

func TestManagedImages(t *testing.T) {
	e := newEnv(t)
	l := e.ok("GET", base+"/managed-microvm-images", nil, nil)
	items := l["items"].([]any)
	if len(items) != 1 || items[0].(map[string]any)["imageArn"] != baseARN {
		t.Fatalf("ListManagedMicrovmImages = %v", l)
	}
	vs := e.ok("GET", base+"/managed-microvm-images/"+url.PathEscape(baseARN)+"/versions", nil, nil)
	if it := vs["items"].([]any); len(it) != 1 || it[0].(map[string]any)["status"] != "AVAILABLE" {
		t.Fatalf("ListManagedMicrovmImageVersions = %v", vs)
	}
	_, err := do(t, e.c, "GET", base+"/managed-microvm-images/nope/versions", nil, nil)
	fails(t, err, "ResourceNotFoundException", "nope")
}

func TestCreateImageValidation(t *testing.T) {
	e := newEnv(t)
	e.ok("POST", base+"/microvm-images", nil, imageBody("taken"))
	tests := []struct {
		name   string
		change func(m map[string]any)
		typ    string
		want   string
	}{
		{"missing name", func(m map[string]any) { delete(m, "name") }, "ValidationException", "'name'"},
		{"bad name", func(m map[string]any) { m["name"] = "-x" }, "ValidationException", "'name'"},
		{"missing base image", func(m map[string]any) { delete(m, "baseImageArn") }, "ValidationException", "'baseImageArn'"},
		{"unknown base image", func(m map[string]any) { m["baseImageArn"] = "arn:aws:lambda:us-east-1:aws:microvm-image:nope" }, "ValidationException", "managed image"},
		{"bad base version", func(m map[string]any) { m["baseImageVersion"] = "9" }, "ValidationException", "'baseImageVersion'"},
		{"missing role", func(m map[string]any) { delete(m, "buildRoleArn") }, "ValidationException", "'buildRoleArn'"},
		{"bad role", func(m map[string]any) { m["buildRoleArn"] = "role" }, "ValidationException", "'buildRoleArn'"},
		{"missing code", func(m map[string]any) { delete(m, "codeArtifact") }, "ValidationException", "'codeArtifact'"},
		{"bad hook state", func(m map[string]any) {
			m["hooks"] = map[string]any{"microvmHooks": map[string]any{"run": "maybe"}}
		}, "ValidationException", "'hooks.microvmHooks.run'"},
		{"run hook too slow", func(m map[string]any) {
			m["hooks"] = map[string]any{"microvmHooks": map[string]any{"runTimeoutInSeconds": 61}}
		}, "ValidationException", "less than or equal to 60"},
		{"build hook may be slow", func(m map[string]any) {
			m["hooks"] = map[string]any{"microvmImageHooks": map[string]any{"readyTimeoutInSeconds": 3601}}
		}, "ValidationException", "less than or equal to 3600"},
		{"bad hook port", func(m map[string]any) { m["hooks"] = map[string]any{"port": 70000} }, "ValidationException", "'hooks.port'"},
		{"bad logging", func(m map[string]any) { m["logging"] = map[string]any{} }, "ValidationException", "'logging'"},
		{"bad arch", func(m map[string]any) { m["cpuConfigurations"] = []any{map[string]any{"architecture": "MIPS"}} }, "ValidationException", "cpuConfigurations.1.architecture"},
		{"bad memory", func(m map[string]any) { m["resources"] = []any{map[string]any{"minimumMemoryInMiB": 1}} }, "ValidationException", "minimumMemoryInMiB"},
		{"bad env key", func(m map[string]any) { m["environmentVariables"] = map[string]any{"A B": "y"} }, "ValidationException", "environmentVariables"},
		{"bad connector", func(m map[string]any) { m["egressNetworkConnectors"] = []any{"x"} }, "ValidationException", "egressNetworkConnectors.1"},
		{"wrong type", func(m map[string]any) { m["name"] = 5 }, "ValidationException", "name"},
		{"aws tag", func(m map[string]any) { m["tags"] = map[string]any{"aws:x": "y"} }, "ValidationException", "tags"},
		{"duplicate name", func(m map[string]any) { m["name"] = "taken" }, "ConflictException", "already exists"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := imageBody("fresh")
			tt.change(body)
			_, err := do(t, e.c, "POST", base+"/microvm-images", nil, body)
			fails(t, err, tt.typ, tt.want)
		})
	}
	t.Run("update version status", func(t *testing.T) {
		_, err := do(t, e.c, "PATCH", base+"/microvm-images/taken/versions/1", nil, map[string]any{"status": "GONE"})
		fails(t, err, "ValidationException", "'status'")
	})
	t.Run("unknown version", func(t *testing.T) {
		_, err := do(t, e.c, "GET", base+"/microvm-images/taken/versions/7", nil, nil)
		fails(t, err, "ResourceNotFoundException", "taken:7")
	})
	t.Run("unknown build", func(t *testing.T) {
		_, err := do(t, e.c, "GET", base+"/microvm-images/taken/versions/1/builds/nope", nil, nil)
		fails(t, err, "ResourceNotFoundException", "nope")
	})
	t.Run("bad maxResults", func(t *testing.T) {
		_, err := do(t, e.c, "GET", base+"/microvm-images", url.Values{"maxResults": {"0"}}, nil)
		fails(t, err, "ValidationException", "'maxResults'")
	})
	t.Run("bad nextToken", func(t *testing.T) {
		_, err := do(t, e.c, "GET", base+"/microvm-images", url.Values{"nextToken": {"!!"}}, nil)
		fails(t, err, "ValidationException", "nextToken")
	})
}

func TestMicrovmLifecycle(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	payload := `{"hello":"world"}`
	run := e.ok("POST", base+"/microvms", nil, map[string]any{
		"imageIdentifier": "arn:aws:lambda:us-east-1:111111111111:microvm-image:app",
		"idlePolicy":      map[string]any{"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0, "autoResumeEnabled": true},
		"runHookPayload":  payload, "maximumDurationInSeconds": 600,
		"executionRoleArn":         roleARN,
		"ingressNetworkConnectors": []any{"arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS", "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"},
		"egressNetworkConnectors":  []any{"arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"},
	})
	id := run["microvmId"].(string)
	if run["state"] != "PENDING" || run["endpoint"] != "https://"+id+".microvm.localhost:8443" || run["imageVersion"] != "1.0" ||
		run["maximumDurationInSeconds"] != float64(600) || run["executionRoleArn"] != roleARN {
		t.Errorf("RunMicrovm = %v", run)
	}
	got := e.waitField(base+"/microvms/"+id, "state", "RUNNING")
	if got["idlePolicy"].(map[string]any)["maxIdleDurationSeconds"] != float64(60) {
		t.Errorf("GetMicrovm = %v", got)
	}
	rec, _ := e.st.GetMicrovm(context.Background(), e.key.Account, id)
	if rec.RunHookPayload != payload {
		t.Errorf("stored runHookPayload = %q", rec.RunHookPayload)
	}
	arn := "arn:aws:lambda:us-east-1:111111111111:microvm:" + id
	e.ok("GET", base+"/microvms/"+url.PathEscape(arn), nil, nil)

	_, err := do(t, e.c, "POST", base+"/microvms/"+id+"/resume", nil, nil)
	fails(t, err, "ConflictException", "RUNNING")
	e.ok("POST", base+"/microvms/"+id+"/suspend", nil, nil)
	e.waitField(base+"/microvms/"+id, "state", "SUSPENDED")
	_, err = do(t, e.c, "POST", base+"/microvms/"+id+"/suspend", nil, nil)
	fails(t, err, "ConflictException", "SUSPENDED")
	e.ok("POST", base+"/microvms/"+id+"/resume", nil, nil)
	e.waitField(base+"/microvms/"+id, "state", "RUNNING")

	tok := e.ok("POST", base+"/microvms/"+id+"/auth-token", nil, map[string]any{
		"expirationInMinutes": 5, "allowedPorts": []any{map[string]any{"port": 8080}, map[string]any{"range": map[string]any{"startPort": 1, "endPort": 10}}, map[string]any{"allPorts": map[string]any{}}}})
	if tok["authToken"].(map[string]any)["X-aws-proxy-auth"] == "" {
		t.Errorf("CreateMicrovmAuthToken = %v", tok)
	}
	tok = e.ok("POST", base+"/microvms/"+id+"/shell-auth-token", nil, map[string]any{"expirationInMinutes": 5})
	if tok["authToken"] == nil {
		t.Errorf("CreateMicrovmShellAuthToken = %v", tok)
	}
	tokenErrors := []struct {
		name string
		path string
		body map[string]any
		want string
	}{
		{"no expiration", "auth-token", map[string]any{"allowedPorts": []any{map[string]any{"port": 1}}}, "'expirationInMinutes'"},
		{"expiration too long", "auth-token", map[string]any{"expirationInMinutes": 61, "allowedPorts": []any{map[string]any{"port": 1}}}, "'expirationInMinutes'"},
		{"no ports", "auth-token", map[string]any{"expirationInMinutes": 1}, "'allowedPorts'"},
		{"bad port", "auth-token", map[string]any{"expirationInMinutes": 1, "allowedPorts": []any{map[string]any{"port": 0}}}, "allowedPorts.1.port"},
		{"two choices", "auth-token", map[string]any{"expirationInMinutes": 1, "allowedPorts": []any{map[string]any{"port": 1, "allPorts": map[string]any{}}}}, "exactly one"},
		{"bad range", "auth-token", map[string]any{"expirationInMinutes": 1, "allowedPorts": []any{map[string]any{"range": map[string]any{"startPort": 9, "endPort": 1}}}}, "allowedPorts.1.range"},
		{"shell no expiration", "shell-auth-token", map[string]any{}, "'expirationInMinutes'"},
	}
	for _, tt := range tokenErrors {
		t.Run(tt.name, func(t *testing.T) {
			_, err := do(t, e.c, "POST", base+"/microvms/"+id+"/"+tt.path, nil, tt.body)
			fails(t, err, "ValidationException", tt.want)
		})
	}

	e.ok("DELETE", base+"/microvms/"+id, nil, nil)
	term := e.waitField(base+"/microvms/"+id, "state", "TERMINATED")
	if term["terminatedAt"] == nil || !strings.Contains(term["stateReason"].(string), "UserRequested") {
		t.Errorf("terminated = %v", term)
	}
	_, err = do(t, e.c, "DELETE", base+"/microvms/"+id, nil, nil)
	fails(t, err, "ConflictException", "TERMINATED")
	noShell := e.runningVM(map[string]any{"imageIdentifier": "app"})
	_, err = do(t, e.c, "POST", base+"/microvms/"+noShell+"/shell-auth-token", nil, map[string]any{"expirationInMinutes": 5})
	fails(t, err, "ValidationException", "SHELL_INGRESS")
	lg := e.ok("GET", "/kiln/v1/microvms/"+id+"/log", url.Values{"offset": {"0"}}, nil)
	if l := lg["log"].(string); !strings.Contains(l, "StartMicrovm") || !strings.Contains(l, "TerminateMicrovm") || lg["nextOffset"] != float64(len(l)) {
		t.Errorf("microvm log = %v", lg)
	}
	_, err = do(t, e.c, "POST", base+"/microvms/"+id+"/shell-auth-token", nil, map[string]any{"expirationInMinutes": 5})
	fails(t, err, "ConflictException", "TERMINATED")
	_, err = do(t, e.c, "GET", base+"/microvms/mvm-nope", nil, nil)
	fails(t, err, "ResourceNotFoundException", "mvm-nope")
}

func TestRunMicrovmValidation(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	idle := func(kv ...any) map[string]any {
		m := map[string]any{"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0, "autoResumeEnabled": true}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(m, kv[i].(string))
			} else {
				m[kv[i].(string)] = kv[i+1]
			}
		}
		return m
	}
	tests := []struct {
		name string
		body map[string]any
		typ  string
		want string
	}{
		{"no image", map[string]any{}, "ValidationException", "'imageIdentifier'"},
		{"unknown image", map[string]any{"imageIdentifier": "nope"}, "ResourceNotFoundException", "nope"},
		{"image of another account", map[string]any{"imageIdentifier": "arn:aws:lambda:us-east-1:222222222222:microvm-image:app"}, "ResourceNotFoundException", "222222222222"},
		{"unknown version", map[string]any{"imageIdentifier": "app", "imageVersion": "9"}, "ResourceNotFoundException", "app:9"},
		{"idle missing maxIdle", map[string]any{"imageIdentifier": "app", "idlePolicy": idle("maxIdleDurationSeconds", nil)}, "ValidationException", "'idlePolicy.maxIdleDurationSeconds'"},
		{"idle missing suspended", map[string]any{"imageIdentifier": "app", "idlePolicy": idle("suspendedDurationSeconds", nil)}, "ValidationException", "'idlePolicy.suspendedDurationSeconds'"},
		{"idle missing autoResume", map[string]any{"imageIdentifier": "app", "idlePolicy": idle("autoResumeEnabled", nil)}, "ValidationException", "'idlePolicy.autoResumeEnabled'"},
		{"idle too short", map[string]any{"imageIdentifier": "app", "idlePolicy": idle("maxIdleDurationSeconds", 59)}, "ValidationException", "greater than or equal to 60"},
		{"suspended negative", map[string]any{"imageIdentifier": "app", "idlePolicy": idle("suspendedDurationSeconds", -1)}, "ValidationException", "greater than or equal to 0"},
		{"duration too long", map[string]any{"imageIdentifier": "app", "maximumDurationInSeconds": 28801}, "ValidationException", "'maximumDurationInSeconds'"},
		{"duration zero", map[string]any{"imageIdentifier": "app", "maximumDurationInSeconds": 0}, "ValidationException", "'maximumDurationInSeconds'"},
		{"bad role", map[string]any{"imageIdentifier": "app", "executionRoleArn": "arn:aws:iam::1:user/x"}, "ValidationException", "'executionRoleArn'"},
		{"bad ingress", map[string]any{"imageIdentifier": "app", "ingressNetworkConnectors": []any{"nope"}}, "ValidationException", "ingressNetworkConnectors.1"},
		{"bad logging", map[string]any{"imageIdentifier": "app", "logging": map[string]any{"disabled": map[string]any{}, "cloudWatch": map[string]any{}}}, "ValidationException", "'logging'"},
		{"payload too big", map[string]any{"imageIdentifier": "app", "runHookPayload": strings.Repeat("x", 16<<10+1)}, "ValidationException", "'runHookPayload'"},
		{"not json", nil, "ValidationException", "JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			if tt.body == nil {
				_, err = e.c.Do(context.Background(), "POST", base+"/microvms", nil, []byte("{"))
			} else {
				_, err = do(t, e.c, "POST", base+"/microvms", nil, tt.body)
			}
			fails(t, err, tt.typ, tt.want)
		})
	}
	t.Run("max duration accepted", func(t *testing.T) {
		e.ok("POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app", "maximumDurationInSeconds": 28800})
	})
}

func TestIdempotency(t *testing.T) {
	e := newEnv(t)
	body := imageBody("app")
	body["clientToken"] = "tok-1"
	a := e.ok("POST", base+"/microvm-images", nil, body)
	b := e.ok("POST", base+"/microvm-images", nil, body)
	if a["imageArn"] != b["imageArn"] || b["imageVersion"] != "1.0" {
		t.Errorf("repeated CreateMicrovmImage = %v, first %v", b, a)
	}
	body["description"] = "changed"
	_, err := do(t, e.c, "POST", base+"/microvm-images", nil, body)
	fails(t, err, "ConflictException", "tok-1")
	e.waitField(base+"/microvm-images/app", "state", "CREATED")

	upd := imageBody("")
	delete(upd, "name")
	upd["clientToken"] = "u-1"
	u1 := e.ok("PUT", base+"/microvm-images/app", nil, upd)
	u2 := e.ok("PUT", base+"/microvm-images/app", nil, upd)
	if u1["imageVersion"] != "2.0" || u2["imageVersion"] != "2.0" {
		t.Errorf("repeated UpdateMicrovmImage versions %v, %v", u1["imageVersion"], u2["imageVersion"])
	}
	e.waitField(base+"/microvm-images/app", "state", "UPDATED")

	run := map[string]any{"imageIdentifier": "app", "clientToken": "r-1", "maximumDurationInSeconds": 100}
	r1 := e.ok("POST", base+"/microvms", nil, run)
	r2 := e.ok("POST", base+"/microvms", nil, run)
	if r1["microvmId"] != r2["microvmId"] {
		t.Errorf("repeated RunMicrovm made %v and %v", r1["microvmId"], r2["microvmId"])
	}
	run["maximumDurationInSeconds"] = 200
	_, err = do(t, e.c, "POST", base+"/microvms", nil, run)
	fails(t, err, "ConflictException", "r-1")
	// Tokens are per account.
	other := e.client(e.newKey("222222222222"))
	_, err = do(t, other, "POST", base+"/microvms", nil, run)
	fails(t, err, "ResourceNotFoundException", "app")
}

func TestTenancy(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	id := e.runningVM(map[string]any{"imageIdentifier": "app"})
	other := e.client(e.newKey("222222222222"))
	vmARN := "arn:aws:lambda:us-east-1:111111111111:microvm:" + id
	checks := []struct {
		name, method, path string
		body               any
	}{
		{"get microvm", "GET", base + "/microvms/" + id, nil},
		{"get microvm by arn", "GET", base + "/microvms/" + url.PathEscape(vmARN), nil},
		{"suspend", "POST", base + "/microvms/" + id + "/suspend", nil},
		{"terminate", "DELETE", base + "/microvms/" + id, nil},
		{"token", "POST", base + "/microvms/" + id + "/auth-token", map[string]any{"expirationInMinutes": 1, "allowedPorts": []any{map[string]any{"port": 1}}}},
		{"get image", "GET", base + "/microvm-images/app", nil},
		{"delete image", "DELETE", base + "/microvm-images/app", nil},
		{"list tags", "GET", "/2017-03-31/tags/" + url.PathEscape(vmARN), nil},
		{"tag", "POST", "/2017-03-31/tags/" + url.PathEscape(vmARN), map[string]any{"Tags": map[string]any{"a": "b"}}},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			_, err := do(t, other, c.method, c.path, nil, c.body)
			fails(t, err, "ResourceNotFoundException", "")
		})
	}
	if l := e.ok("GET", base+"/microvms", nil, nil); len(l["items"].([]any)) != 1 {
		t.Errorf("owner's ListMicrovms = %v", l)
	}
	l, err := do(t, other, "GET", base+"/microvms", nil, nil)
	if err != nil || len(l["items"].([]any)) != 0 {
		t.Errorf("other's ListMicrovms = %v, %v", l, err)
	}
	if m := e.ok("GET", base+"/microvms/"+id, nil, nil); m["state"] != "RUNNING" {
		t.Errorf("microvm changed by another account: %v", m)
	}
}

func TestTags(t *testing.T) {
	e := newEnv(t)
	img := e.readyImage("app")
	id := e.runningVM(map[string]any{"imageIdentifier": "app"})
	for _, arn := range []string{img["imageArn"].(string), "arn:aws:lambda:us-east-1:111111111111:microvm:" + id} {
		p := "/2017-03-31/tags/" + url.PathEscape(arn)
		e.ok("POST", p, nil, map[string]any{"Tags": map[string]any{"k1": "v1", "k2": "v2"}})
		e.ok("DELETE", p, url.Values{"tagKeys": {"k2", "absent"}}, nil)
		tags := e.ok("GET", p, nil, nil)["Tags"].(map[string]any)
		if tags["k1"] != "v1" || tags["k2"] != nil {
			t.Errorf("ListTags(%s) = %v", arn, tags)
		}
	}
	_, err := do(t, e.c, "POST", "/2017-03-31/tags/"+url.PathEscape(img["imageArn"].(string)), nil, map[string]any{})
	fails(t, err, "ValidationException", "'Tags'")
	_, err = do(t, e.c, "DELETE", "/2017-03-31/tags/"+url.PathEscape(img["imageArn"].(string)), nil, nil)
	fails(t, err, "ValidationException", "'TagKeys'")
	_, err = do(t, e.c, "GET", "/2017-03-31/tags/"+url.PathEscape("arn:aws:lambda:us-east-1:111111111111:microvm:mvm-x"), nil, nil)
	fails(t, err, "ResourceNotFoundException", "mvm-x")
	many := map[string]any{}
	for i := 0; i < 50; i++ {
		many[fmt.Sprint("t", i)] = "v"
	}
	_, err = do(t, e.c, "POST", "/2017-03-31/tags/"+url.PathEscape(img["imageArn"].(string)), nil, map[string]any{"Tags": many})
	fails(t, err, "ServiceQuotaExceededException", "50")
}

func TestListMicrovmsPagination(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	e.readyImage("other")
	for i := 0; i < 5; i++ {
		e.ok("POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
	}
	e.ok("POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "other"})
	seen := map[string]bool{}
	tok := ""
	pages := 0
	for {
		q := url.Values{"maxResults": {"2"}, "imageIdentifier": {"app"}}
		if tok != "" {
			q.Set("nextToken", tok)
		}
		l := e.ok("GET", base+"/microvms", q, nil)
		pages++
		for _, it := range l["items"].([]any) {
			seen[it.(map[string]any)["microvmId"].(string)] = true
		}
		next, _ := l["nextToken"].(string)
		if next == "" {
			break
		}
		tok = next
	}
	if len(seen) != 5 || pages != 3 {
		t.Errorf("paged through %d microvms in %d pages, want 5 in 3", len(seen), pages)
	}
}

func TestDeadlines(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	short := e.runningVM(map[string]any{"imageIdentifier": "app", "maximumDurationInSeconds": 30})
	susp := e.runningVM(map[string]any{"imageIdentifier": "app", "idlePolicy": map[string]any{"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 10, "autoResumeEnabled": false}})
	long := e.runningVM(map[string]any{"imageIdentifier": "app"})
	e.ok("POST", base+"/microvms/"+susp+"/suspend", nil, nil)
	e.waitField(base+"/microvms/"+susp, "state", "SUSPENDED")

	e.offset.Store(int64(31 * time.Second))
	e.srv.Lifecycle().ReapOnce(context.Background())
	e.be.Wait()
	e.offset.Store(0)
	for id, want := range map[string]string{short: "MaximumDurationExceeded", susp: "SuspendedDurationExceeded"} {
		m := e.waitField(base+"/microvms/"+id, "state", "TERMINATED")
		if !strings.Contains(m["stateReason"].(string), want) {
			t.Errorf("%s stateReason = %v, want %s", id, m["stateReason"], want)
		}
	}
	if m := e.ok("GET", base+"/microvms/"+long, nil, nil); m["state"] != "RUNNING" {
		t.Errorf("microvm without deadline = %v", m["state"])
	}
}

func TestSigV4Rejections(t *testing.T) {
	e := newEnv(t)
	path := base + "/microvms"
	signed := func(k store.AccessKey, at time.Time, mutate func(*http.Request)) *http.Request {
		req, _ := http.NewRequest("GET", e.hs.URL+path, nil)
		if err := auth.SignRequest(context.Background(), v4.NewSigner(), req, nil, k.ID, k.Secret, "lambda", "us-east-1", at); err != nil {
			t.Fatal(err)
		}
		if mutate != nil {
			mutate(req)
		}
		return req
	}
	wrong := e.key
	wrong.Secret = "not-the-secret"
	unknown := e.key
	unknown.ID = "AKIAUNKNOWNUNKNOWN00"
	tests := []struct {
		name string
		req  *http.Request
		want string
	}{
		{"no authorization", func() *http.Request { r, _ := http.NewRequest("GET", e.hs.URL+path, nil); return r }(), "authorization header"},
		{"wrong secret", signed(wrong, time.Now(), nil), "signature does not match"},
		{"unknown key", signed(unknown, time.Now(), nil), "unknown access key"},
		{"clock behind", signed(e.key, time.Now().Add(-6*time.Minute), nil), "expired"},
		{"clock ahead", signed(e.key, time.Now().Add(6*time.Minute), nil), "expired"},
		{"tampered query", signed(e.key, time.Now(), func(r *http.Request) { r.URL.RawQuery = "maxResults=1" }), "signature does not match"},
		{"wrong service", func() *http.Request {
			req, _ := http.NewRequest("GET", e.hs.URL+path, nil)
			auth.SignRequest(context.Background(), v4.NewSigner(), req, nil, e.key.ID, e.key.Secret, "s3", "us-east-1", time.Now())
			return req
		}(), "service"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := http.DefaultClient.Do(tt.req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body struct{ Message string }
			json.NewDecoder(resp.Body).Decode(&body)
			if resp.StatusCode != 403 || resp.Header.Get("x-amzn-ErrorType") != "AccessDeniedException" || !strings.Contains(body.Message, tt.want) {
				t.Errorf("got %d %s %q, want 403 AccessDeniedException containing %q", resp.StatusCode, resp.Header.Get("x-amzn-ErrorType"), body.Message, tt.want)
			}
		})
	}
	t.Run("tampered body", func(t *testing.T) {
		body := []byte(`{"imageIdentifier":"a"}`)
		req, _ := http.NewRequest("POST", e.hs.URL+path, strings.NewReader(string(body)))
		auth.SignRequest(context.Background(), v4.NewSigner(), req, []byte(`{"imageIdentifier":"b"}`), e.key.ID, e.key.Secret, "lambda", "us-east-1", time.Now())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 403 {
			t.Errorf("tampered body: status %d", resp.StatusCode)
		}
	})
	t.Run("deleted key", func(t *testing.T) {
		k := e.newKey("333333333333")
		c := e.client(k)
		if _, err := do(t, c, "GET", path, nil, nil); err != nil {
			t.Fatal(err)
		}
		e.st.DeleteAccessKey(context.Background(), k.ID)
		e.srv.Verifier().Forget(k.ID)
		_, err := do(t, c, "GET", path, nil, nil)
		fails(t, err, "AccessDeniedException", "unknown access key")
	})
}

func TestUnknownRoute(t *testing.T) {
	e := newEnv(t)
	_, err := do(t, e.c, "GET", "/2025-09-09/nothing", nil, nil)
	fails(t, err, "UnknownOperationException", "nothing")
}

func TestRecover(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	ctx := context.Background()
	now := time.Now().UTC()
	for _, st := range []store.MicrovmState{store.StatePending, store.StateSuspending, store.StateTerminating} {
		m := store.Microvm{ID: "mvm-" + strings.ToLower(string(st)), Account: e.key.Account, State: st, ImageName: "app", ImageVersion: "1",
			StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(time.Hour)}
		if err := e.st.CreateMicrovm(ctx, m, nil); err != nil {
			t.Fatal(err)
		}
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := e.srv.Start(sctx); err != nil {
		t.Fatal(err)
	}
	e.be.Wait()
	for id, want := range map[string]string{"mvm-pending": "RUNNING", "mvm-suspending": "SUSPENDED", "mvm-terminating": "TERMINATED"} {
		e.waitField(base+"/microvms/"+id, "state", want)
	}
}

func TestQuotaAndThrottling(t *testing.T) {
	t.Run("microvms per account", func(t *testing.T) {
		e := newEnv(t, func(c *api.Config) {
			c.Quota = store.Quota{Microvms: 2, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: -1}
		})
		e.readyImage("app")
		a := e.runningVM(map[string]any{"imageIdentifier": "app"})
		e.runningVM(map[string]any{"imageIdentifier": "app"})
		_, err := do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
		fails(t, err, "ServiceQuotaExceededException", "quota")
		e.ok("DELETE", base+"/microvms/"+a, nil, nil)
		e.waitField(base+"/microvms/"+a, "state", "TERMINATED")
		e.ok("POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
	})
	t.Run("requests per second", func(t *testing.T) {
		e := newEnv(t, func(c *api.Config) { c.RequestsPerSecond = 5 })
		var err error
		for i := 0; i < 20 && err == nil; i++ {
			_, err = do(t, e.c, "GET", base+"/microvms", nil, nil)
		}
		fails(t, err, "ThrottlingException", "rate")
		// Another account has its own bucket.
		if _, err := do(t, e.client(e.newKey("222222222222")), "GET", base+"/microvms", nil, nil); err != nil {
			t.Errorf("other account throttled: %v", err)
		}
	})
}

func TestCodeArtifacts(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, func(c *api.Config) { c.ArtifactDir = dir; c.OperatorAccounts = []string{"999999999999"} })
	var zipBuf strings.Builder
	if err := awscli.ZipDir(t.TempDir(), &zipWriter{&zipBuf}); err != nil {
		t.Fatal(err)
	}
	zipBytes := []byte(zipBuf.String())
	ctx := context.Background()
	sum := sha256.Sum256(zipBytes)
	hash := hex.EncodeToString(sum[:])
	uri, err := e.c.Upload(ctx, strings.NewReader(string(zipBytes)), int64(len(zipBytes)), hash)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	if !strings.HasPrefix(uri, "file://"+dir+"/111111111111/") {
		t.Errorf("uploaded uri %s", uri)
	}
	withCode := func(name, uri string) map[string]any {
		b := imageBody(name)
		b["codeArtifact"] = map[string]any{"uri": uri}
		return b
	}
	e.ok("POST", base+"/microvm-images", nil, withCode("uploaded", uri))

	other := e.client(e.newKey("222222222222"))
	operator := e.client(e.newKey("999999999999"))
	rejected := []struct {
		name string
		c    *awscli.Client
		uri  string
	}{
		{"host file", e.c, "file:///etc/passwd"},
		{"bare path", e.c, "/etc/passwd"},
		{"traversal", e.c, "file://" + dir + "/111111111111/../222222222222/x.zip"},
		{"upload of another account", other, uri},
		{"unknown scheme", e.c, "ftp://host/x.zip"},
		{"s3 without bucket", e.c, "s3:///x.zip"},
	}
	for _, tt := range rejected {
		t.Run(tt.name, func(t *testing.T) {
			_, err := do(t, tt.c, "POST", base+"/microvm-images", nil, withCode("x-"+strings.ReplaceAll(tt.name, " ", "-"), tt.uri))
			fails(t, err, "ValidationException", "codeArtifact.uri")
		})
	}
	t.Run("operator may name host paths", func(t *testing.T) {
		if _, err := do(t, operator, "POST", base+"/microvm-images", nil, withCode("op", "file:///srv/app.zip")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("hash mismatch", func(t *testing.T) {
		bad := strings.Repeat("0", 64)
		_, err := e.c.Upload(ctx, strings.NewReader(string(zipBytes)), int64(len(zipBytes)), bad)
		fails(t, err, "ValidationException", "does not match")
	})
	t.Run("not a zip", func(t *testing.T) {
		body := "hello"
		s := sha256.Sum256([]byte(body))
		_, err := e.c.Upload(ctx, strings.NewReader(body), int64(len(body)), hex.EncodeToString(s[:]))
		fails(t, err, "ValidationException", "zip")
	})
	t.Run("wrong secret", func(t *testing.T) {
		k := e.key
		k.Secret = "nope"
		_, err := e.client(k).Upload(ctx, strings.NewReader(string(zipBytes)), int64(len(zipBytes)), hash)
		fails(t, err, "AccessDeniedException", "signature")
	})
}

// An upload counts toward the storage quota from the moment it is let in:
// a second upload while the first is still arriving cannot pass the quota
// both fit only one at a time.
func TestUploadsInProgressCountTowardQuota(t *testing.T) {
	e := newEnv(t, func(c *api.Config) {
		c.ArtifactDir = t.TempDir()
		c.Quota = store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: 1500}
	})
	ctx := context.Background()
	pkg := func(fill byte) ([]byte, string) {
		b := append([]byte("PK\x05\x06"), bytes.Repeat([]byte{fill}, 996)...)
		s := sha256.Sum256(b)
		return b, hex.EncodeToString(s[:])
	}
	first, firstHash := pkg('a')
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := e.c.Upload(ctx, pr, int64(len(first)), firstHash)
		done <- err
	}()
	pw.Write(first[:10]) // let in and arriving
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		use := e.ok("GET", "/kiln/v1/quota", nil, nil)["usage"].(map[string]any)
		if use["storageBytes"] == float64(len(first)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the upload in progress is not counted: usage %v", use)
		}
	}
	second, secondHash := pkg('b')
	_, err := e.c.Upload(ctx, bytes.NewReader(second), int64(len(second)), secondHash)
	fails(t, err, "ServiceQuotaExceededException", "quota")
	pw.Write(first[10:])
	pw.Close()
	if err := <-done; err != nil {
		t.Fatalf("the first upload: %v", err)
	}
	// Stored, it still counts.
	_, err = e.c.Upload(ctx, bytes.NewReader(second), int64(len(second)), secondHash)
	fails(t, err, "ServiceQuotaExceededException", "quota")
}

type zipWriter struct{ b *strings.Builder }

func (w *zipWriter) Write(p []byte) (int, error) { return w.b.Write(p) }

// TestReuploadNeedsNoRoom: an account at its storage quota may upload a
// package it already has again (it replaces itself), in a folder and in
// the store, and still not a new one.
func TestReuploadNeedsNoRoom(t *testing.T) {
	pkg := func(fill byte) ([]byte, string) {
		b := append([]byte("PK\x05\x06"), bytes.Repeat([]byte{fill}, 996)...)
		s := sha256.Sum256(b)
		return b, hex.EncodeToString(s[:])
	}
	quota := store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: 1000}
	for _, mode := range []string{"folder", "store"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, func(c *api.Config) { c.ArtifactDir, c.Quota = t.TempDir(), quota })
			c := e.c
			if mode == "store" {
				srv := api.NewServer(api.Config{Uploads: e.st, Quota: quota}, e.st, e.be)
				hs := httptest.NewServer(srv.Handler())
				t.Cleanup(hs.Close)
				c = awscli.NewClient(hs.URL, "us-east-1", auth.Credentials{AccessKeyID: e.key.ID, SecretAccessKey: e.key.Secret})
			}
			ctx := context.Background()
			first, firstHash := pkg('a')
			for i := range 2 {
				if _, err := c.Upload(ctx, bytes.NewReader(first), int64(len(first)), firstHash); err != nil {
					t.Fatalf("upload %d of the package that fills the quota: %v", i+1, err)
				}
			}
			second, secondHash := pkg('b')
			_, err := c.Upload(ctx, bytes.NewReader(second), int64(len(second)), secondHash)
			fails(t, err, "ServiceQuotaExceededException", "quota")
		})
	}
}
