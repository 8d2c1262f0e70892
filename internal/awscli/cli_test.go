package awscli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// The 24 operations of the SDK's model (schemas_0.js), with their routes.
var sdkRoutes = map[string]string{
	"CreateMicrovmAuthToken":          "POST /2025-09-09/microvms/{microvmIdentifier}/auth-token",
	"CreateMicrovmImage":              "POST /2025-09-09/microvm-images",
	"CreateMicrovmShellAuthToken":     "POST /2025-09-09/microvms/{microvmIdentifier}/shell-auth-token",
	"DeleteMicrovmImage":              "DELETE /2025-09-09/microvm-images/{imageIdentifier}",
	"DeleteMicrovmImageVersion":       "DELETE /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
	"GetMicrovm":                      "GET /2025-09-09/microvms/{microvmIdentifier}",
	"GetMicrovmImage":                 "GET /2025-09-09/microvm-images/{imageIdentifier}",
	"GetMicrovmImageBuild":            "GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}",
	"GetMicrovmImageVersion":          "GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
	"ListManagedMicrovmImages":        "GET /2025-09-09/managed-microvm-images",
	"ListManagedMicrovmImageVersions": "GET /2025-09-09/managed-microvm-images/{imageIdentifier}/versions",
	"ListMicrovmImageBuilds":          "GET /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds",
	"ListMicrovmImages":               "GET /2025-09-09/microvm-images",
	"ListMicrovmImageVersions":        "GET /2025-09-09/microvm-images/{imageIdentifier}/versions",
	"ListMicrovms":                    "GET /2025-09-09/microvms",
	"ListTags":                        "GET /2017-03-31/tags/{Resource}",
	"ResumeMicrovm":                   "POST /2025-09-09/microvms/{microvmIdentifier}/resume",
	"RunMicrovm":                      "POST /2025-09-09/microvms",
	"SuspendMicrovm":                  "POST /2025-09-09/microvms/{microvmIdentifier}/suspend",
	"TagResource":                     "POST /2017-03-31/tags/{Resource}",
	"TerminateMicrovm":                "DELETE /2025-09-09/microvms/{microvmIdentifier}",
	"UntagResource":                   "DELETE /2017-03-31/tags/{Resource}",
	"UpdateMicrovmImage":              "PUT /2025-09-09/microvm-images/{imageIdentifier}",
	"UpdateMicrovmImageVersion":       "PATCH /2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
}

func TestOperationsMatchSDK(t *testing.T) {
	if len(awscli.Operations) != len(sdkRoutes) {
		t.Errorf("%d operations, the SDK has %d", len(awscli.Operations), len(sdkRoutes))
	}
	for _, op := range awscli.Operations {
		if got := op.Method + " " + op.Path; got != sdkRoutes[op.Name] {
			t.Errorf("%s: route %q, SDK %q", op.Name, got, sdkRoutes[op.Name])
		}
		if want := awscli.Kebab(op.Name); op.Command != want {
			t.Errorf("%s: command %q, want %q", op.Name, op.Command, want)
		}
	}
}

func TestKebabAndShorthand(t *testing.T) {
	for in, want := range map[string]string{"imageIdentifier": "image-identifier", "Resource": "resource", "maximumDurationInSeconds": "maximum-duration-in-seconds"} {
		if got := awscli.Kebab(in); got != want {
			t.Errorf("Kebab(%s) = %s", in, got)
		}
	}
	v, err := awscli.ParseJSONArg("maxIdleDurationSeconds=60, autoResumeEnabled=true,name=x")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	if string(b) != `{"autoResumeEnabled":true,"maxIdleDurationSeconds":60,"name":"x"}` {
		t.Errorf("shorthand = %s", b)
	}
	if _, err := awscli.ParseJSONArg("{bad"); err == nil {
		t.Error("bad JSON accepted")
	}
}

func TestCommandsAgainstServer(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	k, _ := auth.NewAccessKey("123456789012", "cli")
	if err := st.CreateAccessKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	be := fakebackend.New(lifecycle.NewReporter(st), 5*time.Millisecond)
	artifacts := t.TempDir()
	hs := httptest.NewServer(api.NewServer(api.Config{ArtifactDir: artifacts}, st, be).Handler())
	defer func() { hs.Close(); be.Wait() }()
	t.Setenv("AWS_ACCESS_KEY_ID", k.ID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", k.Secret)
	t.Setenv("AWS_ENDPOINT_URL", hs.URL)

	run := func(args ...string) (string, error) {
		cmd := awscli.Command(awscli.Find(args[0]), func() string { return t.TempDir() })
		var out, errOut bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&errOut)
		cmd.SetArgs(args[1:])
		cmd.SilenceUsage, cmd.SilenceErrors = true, true
		err := cmd.ExecuteContext(ctx)
		return out.String(), err
	}
	out, err := run("CreateMicrovmImage", "--name", "app", "--base-image-arn", "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"--build-role-arn", "arn:aws:iam::123456789012:role/b", "--code-artifact", `{"uri":"s3://kiln-test/x.zip"}`, "--tags", "team=a", "--wait")
	if err != nil || !strings.Contains(out, `"state": "CREATED"`) {
		t.Fatalf("create-microvm-image --wait: %v\n%s", err, out)
	}
	out, err = run("RunMicrovm", "--image-identifier", "app", "--idle-policy", "maxIdleDurationSeconds=60,suspendedDurationSeconds=0,autoResumeEnabled=true",
		"--maximum-duration-in-seconds", "600", "--wait")
	if err != nil || !strings.Contains(out, `"state": "RUNNING"`) {
		t.Fatalf("run-microvm --wait: %v\n%s", err, out)
	}
	var vm map[string]any
	json.Unmarshal([]byte(out), &vm)
	id := vm["microvmId"].(string)
	if _, ok := vm["startedAt"].(string); !ok {
		t.Errorf("startedAt not shown as a date: %v", vm["startedAt"])
	}
	out, err = run("GetMicrovm", "--cli-input-json", `{"microvmIdentifier":"`+id+`"}`, "--output", "table")
	if err != nil || !strings.Contains(out, "state") || !strings.Contains(out, "RUNNING") {
		t.Fatalf("get-microvm --cli-input-json --output table: %v\n%s", err, out)
	}
	out, err = run("ListMicrovms", "--output", "table")
	if err != nil || !strings.Contains(out, id) {
		t.Fatalf("list-microvms: %v\n%s", err, out)
	}
	// Auto-pagination merges pages; --max-results gives one page.
	for i := 0; i < 2; i++ {
		if _, err := run("RunMicrovm", "--image-identifier", "app"); err != nil {
			t.Fatal(err)
		}
	}
	out, err = run("ListMicrovms")
	if err != nil || strings.Count(out, "microvmId") != 3 || strings.Contains(out, "nextToken") {
		t.Fatalf("list-microvms (all pages): %v\n%s", err, out)
	}
	out, err = run("ListMicrovms", "--max-results", "1")
	if err != nil || strings.Count(out, "microvmId") != 1 || !strings.Contains(out, "nextToken") {
		t.Fatalf("list-microvms --max-results 1: %v\n%s", err, out)
	}
	app := t.TempDir()
	os.WriteFile(filepath.Join(app, "Dockerfile"), []byte("FROM scratch\n"), 0o644)
	out, err = run("CreateMicrovmImage", "--name", "uploaded", "--base-image-arn", "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"--build-role-arn", "arn:aws:iam::123456789012:role/b", "--code", app)
	if err != nil || !strings.Contains(out, "file://"+artifacts+"/123456789012/") {
		t.Fatalf("create-microvm-image --code: %v\n%s", err, out)
	}
	out, err = run("RunMicrovm", "--generate-cli-skeleton")
	if err != nil || !strings.Contains(out, `"idlePolicy": {}`) {
		t.Fatalf("--generate-cli-skeleton: %v\n%s", err, out)
	}
	arn := "arn:aws:lambda:us-east-1:123456789012:microvm:" + id
	if _, err := run("TagResource", "--resource", arn, "--tags", `{"a":"1","b":"2"}`); err != nil {
		t.Fatal(err)
	}
	if _, err := run("UntagResource", "--resource", arn, "--tag-keys", "a,zz"); err != nil {
		t.Fatal(err)
	}
	out, err = run("ListTags", "--resource", arn)
	if err != nil || !strings.Contains(out, `"b": "2"`) || strings.Contains(out, `"a"`) {
		t.Fatalf("list-tags: %v\n%s", err, out)
	}
	out, err = run("TerminateMicrovm", "--microvm-identifier", id, "--wait")
	if err != nil || !strings.Contains(out, "TERMINATED") {
		t.Fatalf("terminate-microvm --wait: %v\n%s", err, out)
	}
	var off int64
	var logs bytes.Buffer
	state, err := awscli.FollowMicrovmLog(ctx, awscli.NewClient(hs.URL, "us-east-1", auth.Credentials{AccessKeyID: k.ID, SecretAccessKey: k.Secret}), id, &off, &logs)
	if err != nil || state != "TERMINATED" || !strings.Contains(logs.String(), "TerminateMicrovm") || off != int64(logs.Len()) {
		t.Errorf("FollowMicrovmLog: %q, %v, %q", state, err, logs.String())
	}
	if _, err := run("RunMicrovm"); err == nil || !strings.Contains(err.Error(), "--image-identifier is required") {
		t.Errorf("missing required flag: %v", err)
	}
	if _, err := run("GetMicrovm", "--microvm-identifier", "mvm-none"); !awscli.IsNotFound(err) {
		t.Errorf("unknown microvm: %v", err)
	}
}
