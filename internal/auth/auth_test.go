package auth

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseAuthorization(t *testing.T) {
	tests := []struct {
		name, header, wantErr string
	}{
		{"ok", "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc", ""},
		{"other algorithm", "AWS4-ECDSA-P256-SHA256 Credential=x", "not AWS4-HMAC-SHA256"},
		{"empty", "", "missing"},
		{"bad scope", "AWS4-HMAC-SHA256 Credential=AKIA/20260101/lambda, SignedHeaders=host, Signature=abc", "malformed credential scope"},
		{"no signature", "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host", "incomplete"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseAuthorization(tt.header)
			if tt.wantErr == "" {
				if err != nil || c.keyID != "AKIA" || c.region != "us-east-1" || c.service != "lambda" || len(c.signedHeaders) != 2 {
					t.Fatalf("got %+v, %v", c, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestCredentialsFile(t *testing.T) {
	k, err := NewAccessKey("123456789012", "x")
	if err != nil {
		t.Fatal(err)
	}
	if len(k.ID) != 20 || !strings.HasPrefix(k.ID, "AKIA") || len(k.Secret) != 40 {
		t.Errorf("key shape: %q %q", k.ID, k.Secret)
	}
	path := filepath.Join(t.TempDir(), "credentials")
	if err := WriteCredentials(path, "default", k); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credentials mode %v, %v", fi.Mode(), err)
	}
	c, err := ReadCredentials(path, "default")
	if err != nil || c.AccessKeyID != k.ID || c.SecretAccessKey != k.Secret {
		t.Fatalf("read back %+v, %v", c, err)
	}
	if _, err := ReadCredentials(path, "other"); err == nil {
		t.Error("missing profile accepted")
	}
}
