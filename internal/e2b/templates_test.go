package e2b

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
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
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	lc "github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// newTemplateEnv is newEnv with the template builder on: a templates
// folder, and an API server that accepts uploads.
func newTemplateEnv(t *testing.T) (*env, string) {
	e := newEnv(t)
	dir := t.TempDir()
	be := fakebackend.New(lc.NewReporter(e.st), 0)
	t.Cleanup(be.Wait)
	e.api = api.NewServer(api.Config{ArtifactDir: filepath.Join(dir, "artifacts")}, e.st, be)
	e.srv = New(Config{API: e.api, Store: e.st, Sandboxes: e.st, Tokens: e.tokens, Domain: "microvm.localhost:8443",
		TemplatesDir: filepath.Join(dir, "e2b-templates"), ArtifactDir: filepath.Join(dir, "artifacts"), MaxUploadBytes: 1 << 20,
		WaitTimeout: 10 * time.Second})
	hs := httptest.NewServer(e.srv.Handler())
	t.Cleanup(hs.Close)
	e.url = hs.URL
	return e, dir
}

// tarGz is a gzip'd tar of entries (name → content; a "->" prefix makes a
// symbolic link to the rest).
func tarGz(t *testing.T, entries map[string]string) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	tw := tar.NewWriter(zw)
	for name, body := range entries {
		if target, ok := strings.CutPrefix(body, "->"); ok {
			tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777})
			continue
		}
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))})
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	return b.Bytes()
}

func put(t *testing.T, u string, body []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("PUT", u, bytes.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// uploadLink asks for the upload URL of hash, as the SDK does.
func (e *env) uploadLink(key, tmpl, hash string) (present bool, u string) {
	e.t.Helper()
	a := e.do(key, "GET", "/templates/"+tmpl+"/files/"+hash, nil)
	e.want(a, 201, "files link")
	var out struct {
		Present bool   `json:"present"`
		URL     string `json:"url"`
	}
	a.json(e.t, &out)
	return out.Present, out.URL
}

const hashA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

// TestTemplateBuild drives the routes of Template.build as the SDK calls
// them: request, upload by hash, trigger, status until ready; then the
// alias check, the list and the code package kiln made.
func TestTemplateBuild(t *testing.T) {
	e, _ := newTemplateEnv(t)
	a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "my-tpl:v1", "memoryMB": 512})
	e.want(a, 202, "request build")
	var req struct {
		TemplateID string   `json:"templateID"`
		BuildID    string   `json:"buildID"`
		Tags       []string `json:"tags"`
	}
	a.json(t, &req)
	if req.TemplateID != "my-tpl" || !buildIDRE.MatchString(req.BuildID) || len(req.Tags) != 1 || req.Tags[0] != "v1" {
		t.Fatalf("request build answered %s", a.body)
	}
	present, u := e.uploadLink(e.key, "my-tpl", hashA)
	if present {
		t.Fatal("files present before any upload")
	}
	if st, body := put(t, u, tarGz(t, map[string]string{"hello.txt": "hi\n", "dir/b.txt": "b\n"})); st != 200 {
		t.Fatalf("upload: %d %s", st, body)
	}
	if present, _ = e.uploadLink(e.key, "my-tpl", hashA); !present {
		t.Fatal("files not present after the upload")
	}
	if present, _ = e.uploadLink(e.otherKey, "my-tpl", hashA); present {
		t.Fatal("another account sees the account's upload")
	}
	start := map[string]any{"fromImage": "debian:stable", "startCmd": "sleep infinity", "readyCmd": `[ -n "$(ss -Htuln sport = :80)" ]`,
		"steps": []map[string]any{
			{"type": "ENV", "args": []string{"A", `va "q" $HOME`}},
			{"type": "WORKDIR", "args": []string{"/opt/app"}},
			{"type": "COPY", "args": []string{"hello.txt", "/opt/app/", "", "0600"}, "filesHash": hashA},
			{"type": "RUN", "args": []string{"apt-get update && echo done > x", "root"}},
			{"type": "USER", "args": []string{"nobody"}},
		}}
	path := "/v2/templates/my-tpl/builds/" + req.BuildID
	e.want(e.do(e.otherKey, "POST", path, start), 404, "another account's build")
	e.want(e.do(e.key, "POST", path, start), 202, "trigger")
	e.want(e.do(e.key, "POST", path, start), 409, "trigger twice")

	var status struct {
		Status     string     `json:"status"`
		LogEntries []logEntry `json:"logEntries"`
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		a := e.do(e.key, "GET", "/templates/my-tpl/builds/"+req.BuildID+"/status?logsOffset=0", nil)
		e.want(a, 200, "status")
		a.json(t, &status)
		if status.Status == "ready" {
			break
		}
		if status.Status != "building" || time.Now().After(end) {
			t.Fatalf("status: %s", a.body)
		}
	}
	e.want(e.do(e.otherKey, "GET", "/templates/my-tpl/builds/"+req.BuildID+"/status", nil), 404, "another account's status")
	e.want(e.do(e.key, "GET", "/templates/aliases/my-tpl", nil), 200, "alias")
	e.want(e.do(e.key, "GET", "/templates/aliases/nope", nil), 404, "unknown alias")
	e.want(e.do(e.otherKey, "GET", "/templates/aliases/my-tpl", nil), 404, "another account's alias")
	a = e.do(e.key, "GET", "/templates", nil)
	e.want(a, 200, "list")
	if !strings.Contains(string(a.body), `"templateID":"my-tpl"`) {
		t.Fatalf("list: %s", a.body)
	}
	a = e.do(e.key, "GET", "/templates/my-tpl/tags", nil)
	e.want(a, 200, "tags")
	if !strings.Contains(string(a.body), `"tag":"v1"`) {
		t.Fatalf("tags: %s", a.body)
	}

	// The image version's code package: the Dockerfile and the files.
	var v struct {
		CodeArtifact store.CodeArtifact `json:"codeArtifact"`
	}
	if err := e.srv.op(context.Background(), store.AccessKey{ID: "t", Account: e.account}, "GET", "/microvm-images/my-tpl/versions/1", nil, nil, &v); err != nil {
		t.Fatal(err)
	}
	cu, _ := url.Parse(v.CodeArtifact.URI)
	zr, err := zip.OpenReader(cu.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	files := map[string]string{}
	for _, f := range zr.File {
		r, _ := f.Open()
		b, _ := io.ReadAll(r)
		r.Close()
		files[f.Name] = string(b)
	}
	if files[filesDirInZip+"/"+hashA+"/hello.txt"] != "hi\n" {
		t.Errorf("package lacks the uploaded file: %v", files)
	}
	df := files["Dockerfile"]
	for _, want := range []string{"FROM debian:12\n", `ENV A="va \"q\" $HOME"`, "WORKDIR /opt/app\n",
		`COPY --chmod=0600 [".kiln-e2b-files/` + hashA + `/hello.txt","/opt/app/"]`,
		"USER root\nRUN [\"/bin/bash\",\"-c\",\"apt-get update \\u0026\\u0026 echo done \\u003e x\"]\nUSER root\n",
		"USER nobody\n", `CMD ["/bin/bash","-l","-c","sleep infinity"]`,
		`LABEL dev.kiln.ready-command="[ -n \"\$(ss -Htuln sport = :80)\" ]"`} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q:\n%s", want, df)
		}
	}
	if _, err := dockerfile.Parse(strings.NewReader(df), nil); err != nil {
		t.Errorf("kiln's Dockerfile parser refuses it: %v\n%s", err, df)
	}

	// A second build of the same template is the image's next version.
	a = e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "my-tpl"})
	a.json(t, &req)
	e.want(e.do(e.key, "POST", "/v2/templates/my-tpl/builds/"+req.BuildID, map[string]any{"fromImage": "debian:bookworm"}), 202, "second trigger")
	if err := e.srv.op(context.Background(), store.AccessKey{ID: "t", Account: e.account}, "GET", "/microvm-images/my-tpl/versions/2", nil, nil, &v); err != nil {
		t.Fatalf("second build made no version 2: %v", err)
	}
}

// TestTemplateRefusals: what kiln cannot build is a 400 saying what to do,
// before anything is built.
func TestTemplateRefusals(t *testing.T) {
	e, _ := newTemplateEnv(t)
	e.want(e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "../x"}), 400, "bad name")
	e.want(e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "t", "memoryMB": 1 << 20}), 400, "too much memory")
	for _, c := range []struct {
		name string
		body map[string]any
		has  string
	}{
		{"registry image", map[string]any{"fromImage": "python:3"}, "no access to container registries"},
		{"other debian", map[string]any{"fromImage": "debian:trixie"}, "debian-12"},
		{"registry credentials", map[string]any{"fromImage": "debian:12", "fromImageRegistry": map[string]string{"type": "registry"}}, "registries"},
		{"no base", map[string]any{}, "exactly one of fromImage and fromTemplate"},
		{"unknown step", map[string]any{"fromImage": "debian:12", "steps": []map[string]any{{"type": "HEALTHCHECK", "args": []string{"x"}}}}, `template step 1: step type \"HEALTHCHECK`},
		{"copy out of context", map[string]any{"fromImage": "debian:12", "steps": []map[string]any{{"type": "COPY", "args": []string{"../etc", "/x"}, "filesHash": hashA}}}, "must not leave"},
		{"copy not uploaded", map[string]any{"fromImage": "debian:12", "steps": []map[string]any{{"type": "COPY", "args": []string{"a", "/x"}, "filesHash": hashA}}}, "were not uploaded"},
		{"ready command of two lines", map[string]any{"fromImage": "debian:12", "readyCmd": "true\nRUN evil"}, "readyCmd must be one line"},
		{"env newline", map[string]any{"fromImage": "debian:12", "steps": []map[string]any{{"type": "ENV", "args": []string{"A", "x\nRUN evil"}}}}, "values one line"},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "t"})
			var req struct {
				BuildID string `json:"buildID"`
			}
			a.json(t, &req)
			a = e.do(e.key, "POST", "/v2/templates/t/builds/"+req.BuildID, c.body)
			e.want(a, 400, c.name)
			if !strings.Contains(string(a.body), c.has) {
				t.Errorf("%s: %s lacks %q", c.name, a.body, c.has)
			}
		})
	}
}

// TestTemplateUploads: the upload URL is the only authentication of an
// upload, bound to one account and hash and an expiry; uploads are
// bounded, must be archives, and a hostile archive fails the build
// without writing outside its folder.
func TestTemplateUploads(t *testing.T) {
	e, dir := newTemplateEnv(t)
	_, u := e.uploadLink(e.key, "t", hashA)
	good := tarGz(t, map[string]string{"a": "a"})
	tampered := strings.Replace(u, e.account, strings.Repeat("1", len(e.account)), 1)
	if st, _ := put(t, tampered, good); st != 401 {
		t.Errorf("upload with another account in the token: %d", st)
	}
	if st, _ := put(t, u[:len(u)-2]+"xx", good); st != 401 {
		t.Errorf("upload with a bad signature: %d", st)
	}
	if st, _ := put(t, u, bytes.Repeat([]byte{0}, 2<<20)); st != 413 {
		t.Errorf("oversize upload: %d", st)
	}
	if st, _ := put(t, u, []byte("not an archive at all")); st != 400 {
		t.Errorf("a non-archive: %d", st)
	}
	e.srv.cfg.Now = func() time.Time { return time.Now().Add(2 * uploadTokenTTL) }
	if st, _ := put(t, u, good); st != 401 {
		t.Errorf("an expired upload URL: %d", st)
	}
	e.srv.cfg.Now = time.Now

	for name, entries := range map[string]map[string]string{
		"dot-dot":       {"../../escaped": "x"},
		"link out":      {"l": "->/etc", "l/passwd": "x"},
		"absolute name": {"/abs": "x"},
	} {
		t.Run(name, func(t *testing.T) {
			if st, body := put(t, u, tarGz(t, entries)); st != 200 {
				t.Fatalf("upload: %d %s", st, body)
			}
			a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "t"})
			var req struct {
				BuildID string `json:"buildID"`
			}
			a.json(t, &req)
			a = e.do(e.key, "POST", "/v2/templates/t/builds/"+req.BuildID, map[string]any{"fromImage": "debian:12",
				"steps": []map[string]any{{"type": "COPY", "args": []string{".", "/x"}, "filesHash": hashA}}})
			e.want(a, 400, name)
			if _, err := os.Lstat(filepath.Join(dir, "e2b-templates", "escaped")); err == nil {
				t.Fatal("a file escaped the extraction folder")
			}
		})
	}
}

// Template files still arriving count toward the account's bound: a
// second upload meanwhile cannot pass a bound both fit only one at a time.
func TestTemplateUploadsInProgressCount(t *testing.T) {
	e, _ := newTemplateEnv(t)
	first := tarGz(t, map[string]string{"a": strings.Repeat("a", 100)})
	second := tarGz(t, map[string]string{"b": strings.Repeat("b", 100)})
	e.srv.cfg.MaxAccountUploadBytes = int64(len(first) + len(second) - 1)
	_, u1 := e.uploadLink(e.key, "t", hashA)
	_, u2 := e.uploadLink(e.key, "t", strings.Repeat("b", 64))
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("PUT", u1, pr)
	req.ContentLength = int64(len(first))
	done := make(chan int, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	pw.Write(first[:10])
	for deadline := time.Now().Add(10 * time.Second); e.srv.uploading.Held(e.account) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first upload is not held")
		}
	}
	if st, body := put(t, u2, second); st != 429 || !strings.Contains(body, "uploads in progress included") {
		t.Errorf("an upload while another is arriving, past the bound together: %d %s", st, body)
	}
	pw.Write(first[10:])
	pw.Close()
	if st := <-done; st != 200 {
		t.Fatalf("the first upload: %d", st)
	}
	if h := e.srv.uploading.Held(e.account); h != 0 {
		t.Errorf("%d bytes still held after the upload", h)
	}
}

// TestParseBuildStartDockerfile: every accepted request maps onto a
// Dockerfile kiln's parser takes, with one stage and its CMD and ready
// command last.
func TestParseBuildStartDockerfile(t *testing.T) {
	in, err := parseBuildStart([]byte(`{"fromImage":"debian","force":true,"steps":[{"type":"RUN","args":["echo \"a\\\\\" $X\nline2 \\"]},{"type":"ENV","args":["B","\\\\"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	checkDockerfile(t, in)
}

// TestForcedStepsKeyedByBuild: a forced step (and, for force, the whole
// build) is preceded by an ARG holding the build's id, whose value keys
// every later step in the image builder's cache (internal/image's
// TestArgValueKeysLaterSteps), so they run again.
func TestForcedStepsKeyedByBuild(t *testing.T) {
	for _, tt := range []struct {
		body   string
		argAt  int // index of the ARG among the stage's steps
		before string
	}{
		{`{"fromImage":"debian","steps":[{"type":"RUN","args":["a"]},{"type":"RUN","args":["b"],"force":true},{"type":"RUN","args":["c"]}]}`, 1, "b"},
		{`{"fromImage":"debian","force":true,"steps":[{"type":"RUN","args":["a"]},{"type":"RUN","args":["b"]}]}`, 0, "a"},
	} {
		in, err := parseBuildStart([]byte(tt.body))
		if err != nil {
			t.Fatal(err)
		}
		plan := in.dockerfile("debian:12", "bld-\"$x", "")
		p, err := dockerfile.Parse(strings.NewReader(plan.Dockerfile), nil)
		if err != nil {
			t.Fatalf("%v\n%s", err, plan.Dockerfile)
		}
		steps := p.Final().Steps
		a, next := steps[tt.argAt], steps[tt.argAt+1]
		if a.Kind != dockerfile.Arg || a.KVs[0].Key != forceArgName || next.Kind != dockerfile.Run || next.Args[2] != tt.before {
			t.Fatalf("no ARG %s right before RUN %s:\n%s", forceArgName, tt.before, plan.Dockerfile)
		}
		e, err := a.Expand(nil, p.EscapeToken)
		if err != nil || e.KVs[0].Value != "bld-\"$x" {
			t.Fatalf("the ARG's value is %q (%v), want the build id:\n%s", e.KVs[0].Value, err, plan.Dockerfile)
		}
		if n := strings.Count(plan.Dockerfile, "ARG "+forceArgName); n != 1 {
			t.Errorf("%d forcing ARGs, want 1:\n%s", n, plan.Dockerfile)
		}
	}
}

func checkDockerfile(t *testing.T, in buildStart) {
	t.Helper()
	plan := in.dockerfile("debian:12", "0000", "")
	p, err := dockerfile.Parse(strings.NewReader(plan.Dockerfile), nil)
	if err != nil {
		t.Fatalf("kiln's parser refuses the Dockerfile: %v\n%s", err, plan.Dockerfile)
	}
	if len(p.Stages) != 1 {
		t.Fatalf("%d stages:\n%s", len(p.Stages), plan.Dockerfile)
	}
	steps := p.Final().Steps
	n := len(steps)
	if n < 2 || steps[n-2].Kind != dockerfile.Cmd || steps[n-1].Kind != dockerfile.Label || steps[n-1].KVs[0].Key != readyCommandLabel {
		t.Fatalf("the Dockerfile does not end with CMD and the ready command:\n%s", plan.Dockerfile)
	}
	runs := 0
	for _, s := range steps {
		if s.Kind == dockerfile.Run {
			if want := in.Steps[runs]; s.Args[2] != want.Args[0] {
				t.Fatalf("RUN %q became %q", want.Args[0], s.Args[2])
			}
			for runs++; runs < len(in.Steps) && in.Steps[runs].Type != "RUN"; runs++ {
			}
		}
	}
}

func FuzzParseBuildStart(f *testing.F) {
	f.Add([]byte(`{"fromImage":"debian:stable","startCmd":"sleep infinity","readyCmd":"test -f /tmp/x","steps":[{"type":"RUN","args":["apt-get update","root"]},{"type":"COPY","args":["a","/b","user","0644"],"filesHash":"` + hashA + `"},{"type":"ENV","args":["A","b"]},{"type":"WORKDIR","args":["/w"]},{"type":"USER","args":["u"]}]}`))
	f.Add([]byte(`{"fromTemplate":"base","steps":[{"type":"RUN","args":["echo $HOME \\ \"x\""]}],"force":true}`))
	f.Add([]byte(`{"fromImage":"x","fromImageRegistry":{"type":"aws"}}`))
	f.Add([]byte(`{"fromImage":"debian","readyCmd":"[ -n \"$(ss -Htuln sport = :80)\" ] \\\n x"}`))
	f.Add([]byte(`{"steps":[{"type":"ENV","args":["A"]}]}`))
	f.Add([]byte(`{"fromImage":"debian","steps":[{"type":"WORKDIR","args":["/a \\"]},{"type":"RUN","args":["x"]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		in, err := parseBuildStart(body)
		if err != nil {
			return
		}
		for i := range in.Steps {
			in.Steps[i].Force = false // the forcing ARGs between steps are checked by TestForcedStepsKeyedByBuild
		}
		plan := in.dockerfile("debian:12", "0000", "")
		p, err := dockerfile.Parse(strings.NewReader(plan.Dockerfile), nil)
		if err != nil {
			t.Fatalf("accepted request gives a Dockerfile kiln refuses: %v\n%s", err, plan.Dockerfile)
		}
		if len(p.Stages) != 1 {
			t.Fatalf("%d stages:\n%s", len(p.Stages), plan.Dockerfile)
		}
		// Every RUN keeps its command byte for byte.
		runs := []string{}
		for _, s := range in.Steps {
			if s.Type == "RUN" {
				runs = append(runs, s.Args[0])
			}
		}
		got := []string{}
		for _, s := range p.Final().Steps {
			if s.Kind == dockerfile.Run {
				got = append(got, s.Args[len(s.Args)-1])
			}
		}
		if strings.Join(runs, "\x00") != strings.Join(got, "\x00") {
			t.Fatalf("RUN commands %q became %q", runs, got)
		}
		// The ready command reaches the builder as sent.
		steps := p.Final().Steps
		last, err := steps[len(steps)-1].Expand(map[string]string{"HOME": "/root"}, p.EscapeToken)
		if want := cmp.Or(strings.TrimSpace(in.ReadyCmd), "true"); err != nil || len(last.KVs) != 1 ||
			last.KVs[0].Key != readyCommandLabel || (last.KVs[0].Value != in.ReadyCmd && last.KVs[0].Value != want) {
			t.Fatalf("ready command %q became %+v (%v)", in.ReadyCmd, last.KVs, err)
		}
	})
}

func FuzzParseBuildRequest(f *testing.F) {
	f.Add([]byte(`{"name":"my-tpl:v1","tags":["a"],"cpuCount":2,"memoryMB":512}`))
	f.Add([]byte(`{"alias":"x"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		in, err := parseBuildRequest(body)
		if err != nil {
			return
		}
		if !templateNameRE.MatchString(in.Name) {
			t.Fatalf("accepted name %q", in.Name)
		}
	})
}

// TestTemplateFromKilnImage: fromImage naming one of the account's kiln
// images continues that image's Dockerfile with its code package; an image
// built from a host path the account may not read is refused.
func TestTemplateFromKilnImage(t *testing.T) {
	e, dir := newTemplateEnv(t)
	ctx := context.Background()
	key := store.AccessKey{ID: "t", Account: e.account}
	zipPath := filepath.Join(dir, "base.zip")
	f, _ := os.Create(zipPath)
	zw := zip.NewWriter(f)
	for name, body := range map[string]string{"Dockerfile": "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n", "app": "binary"} {
		w, _ := zw.Create(name)
		w.Write([]byte(body))
	}
	zw.Close()
	f.Close()
	uri, err := e.srv.storePackage(ctx, key, zipPath)
	if err != nil {
		t.Fatal(err)
	}
	img := map[string]any{"name": "base", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]string{"uri": uri}}
	if err := e.srv.op(ctx, key, "POST", "/microvm-images", nil, img, nil); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var out struct{ State string }
		if err := e.srv.op(ctx, key, "GET", "/microvm-images/base", nil, nil, &out); err != nil {
			t.Fatal(err)
		}
		if out.State == "CREATED" {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("image is %s", out.State)
		}
	}
	trigger := func(from string) answer {
		a := e.do(e.key, "POST", "/v3/templates", map[string]any{"name": "derived"})
		var req struct {
			BuildID string `json:"buildID"`
		}
		a.json(t, &req)
		return e.do(e.key, "POST", "/v2/templates/derived/builds/"+req.BuildID, map[string]any{"fromTemplate": from,
			"steps": []map[string]any{{"type": "ENV", "args": []string{"A", "1"}}}})
	}
	// newEnv's "tmpl" was built from a host path by the operator; this
	// server names no operator.
	a := trigger("tmpl")
	e.want(a, 400, "an image from a host path")
	if !strings.Contains(string(a.body), "not one of the account's uploads") {
		t.Errorf("refusal says %s", a.body)
	}
	e.want(trigger("base"), 202, "from a kiln image")
	var v struct {
		CodeArtifact store.CodeArtifact `json:"codeArtifact"`
	}
	if err := e.srv.op(ctx, key, "GET", "/microvm-images/derived/versions/1", nil, nil, &v); err != nil {
		t.Fatal(err)
	}
	cu, _ := url.Parse(v.CodeArtifact.URI)
	zr, err := zip.OpenReader(cu.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	files := map[string]string{}
	for _, f := range zr.File {
		r, _ := f.Open()
		b, _ := io.ReadAll(r)
		r.Close()
		files[f.Name] = string(b)
	}
	if files["app"] != "binary" || !strings.HasPrefix(files["Dockerfile"], "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\nENV A=\"1\"\n") {
		t.Errorf("derived package: %q", files)
	}
	// Another account cannot build on it.
	a = e.do(e.otherKey, "POST", "/v3/templates", map[string]any{"name": "derived"})
	var req struct {
		BuildID string `json:"buildID"`
	}
	a.json(t, &req)
	e.want(e.do(e.otherKey, "POST", "/v2/templates/derived/builds/"+req.BuildID, map[string]any{"fromTemplate": "base"}), 400, "another account's image")
}
