package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// runCLI runs a kiln command in-process and returns its output.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	rootCmd.SetOut(&out)
	rootCmd.SetArgs(args)
	defer rootCmd.SetOut(nil)
	err := rootCmd.ExecuteContext(context.Background())
	return out.String(), err
}

// TestEventsAndUsageRoutes drives a real `kiln server` (fake backend: no
// VMs) through run, suspend, resume and terminate, then reads the
// lifecycle events with `kiln events` (microVM and image version), and
// checks who may read whose usage: a tenant its own only, the operator
// any account or all.
func TestEventsAndUsageRoutes(t *testing.T) {
	dir := t.TempDir()
	_, url, _ := runHelper(t, dir)
	ctx := context.Background()
	credFile := filepath.Join(dir, "credentials")
	admin, err := auth.ReadCredentials(credFile, "default")
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	tenant, _ := auth.NewAccessKey("222222222222", "tenant")
	if err := st.CreateAccessKey(ctx, tenant); err != nil {
		t.Fatal(err)
	}
	st.Close()
	op := awscli.NewClient(url, "us-east-1", admin)
	tc := awscli.NewClient(url, "us-east-1", auth.Credentials{AccessKeyID: tenant.ID, SecretAccessKey: tenant.Secret})
	call := func(op string, in map[string]any) map[string]any {
		t.Helper()
		out, err := awscli.Call(ctx, awscli.NewClient(url, "us-east-1", admin), awscli.Find(op), in)
		if err != nil {
			t.Fatalf("%s: %v", op, err)
		}
		return out
	}
	wait := func(getOp, key, id, want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			out, err := awscli.Call(ctx, op, awscli.Find(getOp), map[string]any{key: id})
			if err == nil && out["state"] == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s: want %s, got %v %v", getOp, id, want, out["state"], err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	call("CreateMicrovmImage", map[string]any{"name": "app", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]any{"uri": "s3://kiln-test/x.zip"}})
	wait("GetMicrovmImage", "imageIdentifier", "app", "CREATED")
	id := call("RunMicrovm", map[string]any{"imageIdentifier": "app"})["microvmId"].(string)
	wait("GetMicrovm", "microvmIdentifier", id, "RUNNING")
	call("SuspendMicrovm", map[string]any{"microvmIdentifier": id})
	wait("GetMicrovm", "microvmIdentifier", id, "SUSPENDED")
	call("ResumeMicrovm", map[string]any{"microvmIdentifier": id})
	wait("GetMicrovm", "microvmIdentifier", id, "RUNNING")
	call("TerminateMicrovm", map[string]any{"microvmIdentifier": id})
	wait("GetMicrovm", "microvmIdentifier", id, "TERMINATED")

	flags := []string{"--endpoint-url", url, "--credentials-file", credFile}
	out, err := runCLI(t, append([]string{"events", id, "--json"}, flags...)...)
	if err != nil {
		t.Fatal(err)
	}
	var evs struct {
		Events []struct{ From, State, Reason string } `json:"events"`
	}
	if err := json.Unmarshal([]byte(out), &evs); err != nil {
		t.Fatalf("kiln events --json: %v: %s", err, out)
	}
	var got []string
	for _, e := range evs.Events {
		got = append(got, e.From+">"+e.State+" "+e.Reason)
	}
	want := ">PENDING RunMicrovm|PENDING>RUNNING Started|RUNNING>SUSPENDING SuspendMicrovm|SUSPENDING>SUSPENDED SuspendMicrovm|" +
		"SUSPENDED>RUNNING Resumed|RUNNING>TERMINATING UserRequested: TerminateMicrovm|TERMINATING>TERMINATED UserRequested: TerminateMicrovm"
	if strings.Join(got, "|") != want {
		t.Errorf("kiln events %s:\n got %s\nwant %s", id, strings.Join(got, "|"), want)
	}
	table, err := runCLI(t, append([]string{"events", "app:1", "--json=false"}, flags...)...)
	if err != nil || !strings.Contains(table, "app:1") || !strings.Contains(table, "SUCCESSFUL") || !strings.Contains(table, "PENDING") {
		t.Errorf("kiln events app:1: %v\n%s", err, table)
	}
	// Another account's microVM is not found, events or not.
	if _, err := tc.Do(ctx, "GET", "/kiln/v1/microvms/"+id+"/events", nil, nil); err == nil || !strings.Contains(err.Error(), "ResourceNotFound") {
		t.Errorf("tenant read the operator's events: %v", err)
	}

	// Usage: artifact bytes come from the upload directory.
	if err := os.MkdirAll(filepath.Join(dir, "artifacts", tenant.Account), 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "artifacts", tenant.Account, "x.zip"), make([]byte, 1234), 0o600)
	usage := func(c *awscli.Client, q map[string][]string) ([]map[string]any, error) {
		b, err := c.Do(ctx, "GET", "/kiln/v1/usage", q, nil)
		if err != nil {
			return nil, err
		}
		var u struct {
			Accounts []map[string]any `json:"accounts"`
		}
		return u.Accounts, json.Unmarshal(b, &u)
	}
	if _, err := usage(tc, map[string][]string{"account": {operatorOf(t, dir)}}); err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Errorf("a tenant read the operator's usage: %v", err)
	}
	own, err := usage(tc, nil)
	if err != nil || len(own) != 1 || own[0]["account"] != tenant.Account || own[0]["artifactBytes"] != float64(1234) {
		t.Errorf("tenant's own usage: %v %v", own, err)
	}
	all, err := usage(op, map[string][]string{"since": {"24h"}})
	if err != nil || len(all) == 0 {
		t.Errorf("operator's usage of all: %v %v", all, err)
	}
	if _, err := usage(op, map[string][]string{"since": {"yesterday"}}); err == nil || !strings.Contains(err.Error(), "ValidationException") {
		t.Errorf("bad since accepted: %v", err)
	}
	out, err = runCLI(t, append([]string{"usage", "--account", tenant.Account, "--since", "7d"}, flags...)...)
	if err != nil || !strings.Contains(out, `"artifactBytes": 1234`) {
		t.Errorf("kiln usage --account: %v\n%s", err, out)
	}
}

func operatorOf(t *testing.T, dir string) string {
	t.Helper()
	st, err := openStore(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a, err := st.GetSetting(context.Background(), "operator_account")
	if err != nil {
		t.Fatal(err)
	}
	return a
}
