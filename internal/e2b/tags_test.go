package e2b

import (
	"context"
	"fmt"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// buildTemplate builds name (NAME or NAME:TAG, with tags) as the SDK does
// and waits for it; it returns the build id.
func (e *env) buildTemplate(name string, tags ...string) string {
	e.t.Helper()
	a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": name, "tags": tags})
	e.want(a, 202, "request build "+name)
	var req struct {
		TemplateID, BuildID string
	}
	a.json(e.t, &req)
	e.want(e.do(e.key, "POST", "/v2/templates/"+req.TemplateID+"/builds/"+req.BuildID, map[string]any{"fromImage": "debian:bookworm"}), 202, "trigger "+name)
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var st struct{ Status string }
		e.do(e.key, "GET", "/templates/"+req.TemplateID+"/builds/"+req.BuildID+"/status", nil).json(e.t, &st)
		if st.Status == "ready" {
			return req.BuildID
		}
		if st.Status != "building" || time.Now().After(end) {
			e.t.Fatalf("build of %s is %s", name, st.Status)
		}
	}
}

// versionOf is the image version sandbox id runs.
func (e *env) versionOf(id string) string {
	e.t.Helper()
	m, err := e.st.GetMicrovm(context.Background(), e.account, id)
	if err != nil {
		e.t.Fatal(err)
	}
	return m.ImageVersion
}

// TestTemplateTags: tags given to builds, assigned and removed through
// /templates/tags, name builds in Sandbox.create; a tag that is none is a
// kiln version; tags are the account's own and bounded. Before, NAME:TAG
// was only ever read as a version, and the tag routes were 501.
func TestTemplateTags(t *testing.T) {
	e, _ := newTemplateEnv(t)
	b1 := e.buildTemplate("app:v1")
	b2 := e.buildTemplate("app", "v2", "latest-good")

	tags := func() map[string]string {
		a := e.do(e.key, "GET", "/templates/app/tags", nil)
		e.want(a, 200, "tags")
		var out []struct{ Tag, BuildID, CreatedAt string }
		a.json(t, &out)
		m := map[string]string{}
		for _, r := range out {
			m[r.Tag] = r.BuildID
			if _, err := time.Parse(time.RFC3339, r.CreatedAt); err != nil {
				t.Errorf("tag %s createdAt %q", r.Tag, r.CreatedAt)
			}
		}
		return m
	}
	if got := tags(); got["v1"] != b1 || got["v2"] != b2 || got["latest-good"] != b2 || len(got) != 3 {
		t.Fatalf("tags %v, want v1 %s, v2 and latest-good %s", got, b1, b2)
	}
	for tid, want := range map[string]string{"app:v1": "1.0", "app:v2": "2.0", "app": "2.0", "app:default": "2.0", "app:1.0": "1.0"} {
		if v := e.versionOf(e.create(map[string]any{"templateID": tid})); v != want {
			t.Errorf("Sandbox.create(%q) runs version %s, want %s", tid, v, want)
		}
	}

	// Assign: prod names v1's build; then moves to the newest.
	a := e.do(e.key, "POST", "/templates/tags", map[string]any{"target": "app:v1", "tags": []string{"prod", "stable"}})
	e.want(a, 201, "assign")
	var as struct {
		BuildID string
		Tags    []string
	}
	a.json(t, &as)
	if as.BuildID != b1 || strings.Join(as.Tags, ",") != "prod,stable" {
		t.Fatalf("assign answered %s", a.body)
	}
	if v := e.versionOf(e.create(map[string]any{"templateID": "app:prod"})); v != "1.0" {
		t.Errorf("app:prod runs version %s, want 1.0", v)
	}
	e.want(e.do(e.key, "POST", "/templates/tags", map[string]any{"target": "app", "tags": []string{"prod"}}), 201, "move prod")
	if got := tags(); got["prod"] != b2 || got["stable"] != b1 {
		t.Fatalf("after moving prod: %v", got)
	}
	e.want(e.do(e.key, "DELETE", "/templates/tags", map[string]any{"name": "app", "tags": []string{"stable", "v1"}}), 204, "remove")
	if got := tags(); got["stable"] != "" || got["v1"] != "" || got["prod"] != b2 {
		t.Fatalf("after removing: %v", got)
	}
	e.want(e.do(e.key, "DELETE", "/templates/tags", map[string]any{"name": "app", "tags": []string{"stable"}}), 404, "remove again")
	e.want(e.do(e.key, "POST", "/v2/sandboxes", map[string]any{"templateID": "app:v1"}), 404, "a removed tag is no version")

	// An image built through the AWS API gets tags too, its builds stable ids.
	a = e.do(e.key, "POST", "/templates/tags", map[string]any{"target": "tmpl", "tags": []string{"aws"}})
	e.want(a, 201, "tag an AWS-built image")
	a.json(t, &as)
	if tt := e.do(e.key, "GET", "/templates/tmpl/tags", nil); !buildIDRE.MatchString(as.BuildID) || !strings.Contains(string(tt.body), as.BuildID) {
		t.Fatalf("AWS image's build id %q", as.BuildID)
	}
	if v := e.versionOf(e.create(map[string]any{"templateID": "tmpl:aws"})); v != "1.0" {
		t.Errorf("tmpl:aws runs version %s", v)
	}

	// Refusals: bad targets and tags, another account, the bound.
	for _, c := range []struct {
		body   map[string]any
		status int
	}{
		{map[string]any{"target": "app:nope", "tags": []string{"x"}}, 404},
		{map[string]any{"target": "nope", "tags": []string{"x"}}, 404},
		{map[string]any{"target": "app", "tags": []string{}}, 400},
		{map[string]any{"target": "app", "tags": []string{"a/b"}}, 400},
		{map[string]any{"target": "app", "tags": []string{"default"}}, 400},
		{map[string]any{"target": "../x", "tags": []string{"x"}}, 400},
	} {
		e.want(e.do(e.key, "POST", "/templates/tags", c.body), c.status, fmt.Sprint(c.body))
	}
	e.want(e.do(e.otherKey, "POST", "/templates/tags", map[string]any{"target": "app", "tags": []string{"mine"}}), 404, "another account's template")
	e.want(e.do(e.otherKey, "GET", "/templates/app/tags", nil), 404, "another account's tags")
	e.want(e.do(e.otherKey, "DELETE", "/templates/tags", map[string]any{"name": "app", "tags": []string{"prod"}}), 404, "another account's tag")
	e.want(e.do(e.otherKey, "POST", "/v2/sandboxes", map[string]any{"templateID": "app:prod"}), 404, "another account's tag in create")
	many := make([]string, 16)
	for i := 0; ; i++ {
		for j := range many {
			many[j] = fmt.Sprintf("t%d-%d", i, j)
		}
		a := e.do(e.key, "POST", "/templates/tags", map[string]any{"target": "app", "tags": many})
		if a.status == 400 {
			if !strings.Contains(string(a.body), fmt.Sprint(store.MaxE2BTags)) {
				t.Fatalf("over the bound: %s", a.body)
			}
			break
		}
		e.want(a, 201, "many tags")
		if i > store.MaxE2BTags {
			t.Fatal("no bound on tags")
		}
	}

	// A build whose tags would pass the bound is refused before it starts.
	a = e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "app", "tags": many})
	var over struct{ BuildID string }
	a.json(t, &over)
	e.want(e.do(e.key, "POST", "/v2/templates/app/builds/"+over.BuildID, map[string]any{"fromImage": "debian:bookworm"}), 400, "a build past the tag bound")
	if _, err := e.st.GetImageVersion(context.Background(), e.account, "app", "3.0"); err == nil {
		t.Fatal("the refused build made a version")
	}

	// Deleting the template forgets its tags: a new one of the name starts bare.
	e.want(e.do(e.key, "DELETE", "/templates/app", nil), 204, "delete")
	e.buildTemplate("app")
	if got := tags(); len(got) != 0 {
		t.Fatalf("a new template of a deleted one's name has tags %v", got)
	}
}

// TestTemplateInfo: GET /templates/{id} lists the template's builds (the
// image's versions) with paging; PATCH keeps templates private; the build
// logs route filters by level and pages forward and backward. All were 501.
func TestTemplateInfo(t *testing.T) {
	e, _ := newTemplateEnv(t)
	b1 := e.buildTemplate("info")
	b2 := e.buildTemplate("info")
	var tw struct {
		TemplateID string
		Public     bool
		Names      []string
		Builds     []struct {
			BuildID, Status, CreatedAt, UpdatedAt, FinishedAt string
			MemoryMB, CPUCount                                int64
		}
	}
	a := e.do(e.key, "GET", "/templates/info", nil)
	e.want(a, 200, "get template")
	a.json(t, &tw)
	if tw.TemplateID != "info" || tw.Public || len(tw.Builds) != 2 || tw.Builds[0].BuildID != b1 || tw.Builds[1].BuildID != b2 ||
		tw.Builds[1].Status != "ready" || tw.Builds[1].FinishedAt == "" || tw.Builds[1].MemoryMB < 512 || tw.Builds[1].CPUCount < 1 {
		t.Fatalf("template: %s", a.body)
	}
	a = e.do(e.key, "GET", "/templates/info?limit=1", nil)
	a.json(t, &tw)
	next := a.header.Get("X-Next-Token")
	if len(tw.Builds) != 1 || tw.Builds[0].BuildID != b1 || next == "" {
		t.Fatalf("first page: %s (next %q)", a.body, next)
	}
	a = e.do(e.key, "GET", "/templates/info?limit=1&nextToken="+url.QueryEscape(next), nil)
	a.json(t, &tw)
	if len(tw.Builds) != 1 || tw.Builds[0].BuildID != b2 {
		t.Fatalf("second page: %s", a.body)
	}
	e.want(e.do(e.key, "GET", "/templates/info?limit=0", nil), 400, "limit 0")
	e.want(e.do(e.otherKey, "GET", "/templates/info", nil), 404, "another account's template")
	e.want(e.do(e.key, "GET", "/templates/nope", nil), 404, "unknown template")

	e.want(e.do(e.key, "PATCH", "/templates/info", map[string]any{"public": true}), 400, "make public")
	e.want(e.do(e.key, "PATCH", "/templates/info", map[string]any{"public": false}), 200, "keep private")
	a = e.do(e.key, "PATCH", "/v2/templates/info", map[string]any{"public": false})
	e.want(a, 200, "v2 patch")
	if !strings.Contains(string(a.body), `"names":["info"]`) {
		t.Fatalf("v2 patch answered %s", a.body)
	}
	e.want(e.do(e.otherKey, "PATCH", "/templates/info", map[string]any{"public": false}), 404, "another account's patch")

	logs := func(query string) []logEntry {
		a := e.do(e.key, "GET", "/templates/info/builds/"+b2+"/logs"+query, nil)
		e.want(a, 200, "logs"+query)
		var out struct{ Logs []logEntry }
		a.json(t, &out)
		return out.Logs
	}
	all := logs("")
	if len(all) == 0 {
		t.Fatal("no log entries")
	}
	for _, le := range all {
		if _, err := time.Parse(time.RFC3339Nano, le.Timestamp); err != nil || logLevels[le.Level] < 0 || le.Level == "" {
			t.Fatalf("entry %+v", le)
		}
	}
	if got := logs("?limit=1"); len(got) != 1 || got[0].Message != all[0].Message {
		t.Fatalf("limit 1: %+v, want %q", got, all[0].Message)
	}
	if got := logs("?direction=backward&limit=1"); len(got) != 1 || got[0].Message != all[len(all)-1].Message {
		t.Fatalf("backward: %+v, want %q", got, all[len(all)-1].Message)
	}
	for _, le := range logs("?level=error") {
		if le.Level != "error" {
			t.Fatalf("level=error gave %+v", le)
		}
	}
	if got := logs(fmt.Sprintf("?cursor=%d", time.Now().Add(time.Hour).UnixMilli())); len(got) != 0 {
		t.Fatalf("a cursor after now gave %d entries", len(got))
	}
	if got := logs("?direction=backward&cursor=1"); len(got) != 0 {
		t.Fatalf("backward from 1970 gave %d entries", len(got))
	}
	// The AWS-built image's builds have logs too, under their derived ids.
	a = e.do(e.key, "GET", "/templates/tmpl", nil)
	a.json(t, &tw)
	if len(tw.Builds) != 1 {
		t.Fatalf("tmpl: %s", a.body)
	}
	e.want(e.do(e.key, "GET", "/templates/tmpl/builds/"+tw.Builds[0].BuildID+"/logs", nil), 200, "AWS-built image's logs")
	for q, status := range map[string]int{"?level=loud": 400, "?direction=up": 400, "?limit=101": 400, "?cursor=x": 400, "?source=disk": 400} {
		e.want(e.do(e.key, "GET", "/templates/info/builds/"+b2+"/logs"+q, nil), status, "logs"+q)
	}
	e.want(e.do(e.otherKey, "GET", "/templates/info/builds/"+b2+"/logs", nil), 404, "another account's logs")
	e.want(e.do(e.key, "GET", "/templates/info/builds/00000000-0000-0000-0000-000000000000/logs", nil), 404, "unknown build")
}

func FuzzParseTagRequest(f *testing.F) {
	for _, s := range []string{`{"target":"a:b","tags":["x"]}`, `{"name":"a","tags":["x","y"]}`, `{"tags":[]}`, `{`, `{"target":":","tags":["default"]}`} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, body []byte, assign bool) {
		in, err := parseTagRequest(body, assign)
		if err != nil {
			return
		}
		for _, tg := range in.Tags {
			if !tagRE.MatchString(tg) {
				t.Fatalf("tag %q accepted", tg)
			}
		}
	})
}

func FuzzParseLogsQuery(f *testing.F) {
	for _, s := range []string{"", "cursor=1&direction=backward&level=warn&limit=5&source=persistent", "limit=-1", "cursor=99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		lq, err := parseLogsQuery(v)
		if err == nil && (lq.limit < 0 || lq.limit > maxLogsLimit) {
			t.Fatalf("limit %d accepted", lq.limit)
		}
	})
}

// TestRecordsAcrossReplicas: two E2B servers on one store, as two `kiln
// control` replicas with their own data dirs: a tag assigned, a build
// requested and a snapshot record made through one are what the other
// reads (they were files of each replica's data dir).
func TestRecordsAcrossReplicas(t *testing.T) {
	e, _ := newTemplateEnv(t)
	b1 := e.buildTemplate("app:v1")
	cfg := e.srv.cfg
	cfg.TemplatesDir = t.TempDir()
	other := httptest.NewServer(New(cfg).Handler())
	t.Cleanup(other.Close)
	first := e.url

	e.want(e.do(e.key, "POST", "/templates/tags", map[string]any{"target": "app:v1", "tags": []string{"prod"}}), 201, "assign through the first")
	a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "app"})
	e.want(a, 202, "request a build through the first")
	var req struct{ BuildID string }
	a.json(t, &req)

	e.url = other.URL
	a = e.do(e.key, "GET", "/templates/app/tags", nil)
	e.want(a, 200, "tags through the second")
	if !strings.Contains(string(a.body), `"tag":"prod"`) || !strings.Contains(string(a.body), b1) {
		t.Errorf("the second replica's tags: %s", a.body)
	}
	id := e.create(map[string]any{"templateID": "app:prod"})
	if v := e.versionOf(id); v != "1.0" {
		t.Errorf("app:prod through the second replica runs version %s", v)
	}
	a = e.do(e.key, "GET", "/templates/app/builds/"+req.BuildID+"/status", nil)
	e.want(a, 200, "status through the second of a build requested through the first")
	e.want(e.do(e.key, "DELETE", "/templates/tags", map[string]any{"name": "app", "tags": []string{"prod"}}), 204, "remove through the second")

	e.url = first
	if a := e.do(e.key, "GET", "/templates/app/tags", nil); strings.Contains(string(a.body), `"prod"`) {
		t.Errorf("the first replica still has prod: %s", a.body)
	}
	// A snapshot record made through one (the fake backend copies no VM:
	// the record is written as the snapshot route writes it) is listed by
	// the other.
	if err := e.st.PutE2BSnapshot(t.Context(), store.E2BSnapshot{Account: e.account, Name: "app", SandboxID: id, CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{first, other.URL} {
		e.url = u
		if a := e.do(e.key, "GET", "/snapshots", nil); !strings.Contains(string(a.body), `"snapshotID":"app"`) {
			t.Errorf("snapshots through %s: %s", u, a.body)
		}
	}
}
