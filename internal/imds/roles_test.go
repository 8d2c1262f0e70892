package imds

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseRoles(t *testing.T) {
	for _, tt := range []struct {
		name, in, err string
	}{
		{"profile", `{"roles":{"arn:aws:iam::123456789012:role/app":{"profile":"app"}}}`, ""},
		{"assume", `{"roles":{"arn:aws:iam::123456789012:role/etl":{"assumeRole":{"roleArn":"arn:aws:iam::123456789012:role/etl","endpoint":"http://127.0.0.1:1","durationSeconds":900}}}}`, ""},
		{"both", `{"roles":{"arn:aws:iam::123456789012:role/app":{"profile":"a","assumeRole":{"roleArn":"arn:aws:iam::123456789012:role/etl"}}}}`, "exactly one"},
		{"neither", `{"roles":{"arn:aws:iam::123456789012:role/app":{}}}`, "exactly one"},
		{"bad arn", `{"roles":{"arn:aws:iam::1:role/app":{"profile":"a"}}}`, "not an IAM role ARN"},
		{"typo", `{"roles":{"arn:aws:iam::123456789012:role/app":{"profle":"a"}}}`, "unknown field"},
		{"bad duration", `{"roles":{"arn:aws:iam::123456789012:role/etl":{"assumeRole":{"roleArn":"arn:aws:iam::123456789012:role/etl","durationSeconds":10}}}}`, "900..43200"},
		{"trailing", `{"roles":{}} {}`, "after the JSON"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseRoles([]byte(tt.in))
			if (err == nil) != (tt.err == "") || (err != nil && !strings.Contains(err.Error(), tt.err)) {
				t.Errorf("ParseRoles = %v, want %q", err, tt.err)
			}
		})
	}
}

// TestProfileSource: a role mapped to a profile of the host's AWS
// configuration gets that profile's keys, even when the environment holds
// other keys (the server's own S3 keys, for example).
func TestProfileSource(t *testing.T) {
	dir := t.TempDir()
	credsFile := filepath.Join(dir, "credentials")
	os.WriteFile(credsFile, []byte("[vm-role]\naws_access_key_id = AKIDROLE\naws_secret_access_key = rolesecret\n"), 0o600)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", credsFile)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "none"))
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDSERVER")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "serversecret")
	r, err := ParseRoles([]byte(`{"roles":{"arn:aws:iam::123456789012:role/app":{"profile":"vm-role"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	ps, err := r.Providers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c, err := ps["arn:aws:iam::123456789012:role/app"].Retrieve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c.AccessKeyID != "AKIDROLE" || c.SecretAccessKey != "rolesecret" {
		t.Errorf("credentials = %s/%s, want the profile's", c.AccessKeyID, c.SecretAccessKey)
	}
}

func FuzzParseRoles(f *testing.F) {
	f.Add([]byte(`{"roles":{"arn:aws:iam::123456789012:role/app":{"profile":"app"}}}`))
	f.Add([]byte(`{"roles":{"arn:aws:iam::123456789012:role/etl":{"assumeRole":{"roleArn":"arn:aws:iam::123456789012:role/etl"}}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRoles(b)
		if err != nil {
			return
		}
		for arn, s := range r.Roles {
			if _, err := RoleName(arn); err != nil {
				t.Fatalf("accepted %q: %v", arn, err)
			}
			if (s.Profile == "") == (s.AssumeRole == nil) {
				t.Fatalf("accepted %q with %+v", arn, s)
			}
		}
	})
}

// TestRolesFileReload: a role added to the file while kiln runs is served
// to the next VM; a broken edit keeps the last good roles.
func TestRolesFileReload(t *testing.T) {
	dir := t.TempDir()
	credsFile := filepath.Join(dir, "credentials")
	os.WriteFile(credsFile, []byte("[vm-role]\naws_access_key_id = AKIDROLE\naws_secret_access_key = rolesecret\n"), 0o600)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", credsFile)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "none"))
	path := filepath.Join(dir, "roles.json")
	os.WriteFile(path, []byte(`{"roles":{}}`), 0o600)
	ctx := context.Background()
	f, err := OpenRolesFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	const arn = "arn:aws:iam::123456789012:role/app"
	if _, ok, _ := f.Lookup(ctx, arn); ok {
		t.Fatal("role known before it was added")
	}
	os.WriteFile(path, []byte(`{"roles":{"`+arn+`":{"profile":"vm-role"}}}`), 0o600)
	p, ok, err := f.Lookup(ctx, arn)
	if !ok || err != nil {
		t.Fatalf("added role: ok=%v err=%v", ok, err)
	}
	if c, err := p.Retrieve(ctx); err != nil || c.AccessKeyID != "AKIDROLE" {
		t.Fatalf("credentials %v, %v", c.AccessKeyID, err)
	}
	os.WriteFile(path, []byte(`{"roles":`), 0o600)
	if _, ok, err := f.Lookup(ctx, arn); !ok || err == nil {
		t.Fatalf("broken edit: ok=%v err=%v, want the last good roles and an error", ok, err)
	}
}
