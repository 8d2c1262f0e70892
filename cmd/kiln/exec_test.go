//go:build linux

package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
)

func TestRemotePath(t *testing.T) {
	tests := []struct {
		arg, id, path string
		remote        bool
	}{
		{"mvm-1:/srv/a", "mvm-1", "/srv/a", true},
		{"mvm-1:rel", "mvm-1", "rel", true},
		{"./a:b", "", "", false},
		{"/abs/a:b", "", "", false},
		{":x", "", "", false},
		{"plain", "", "", false},
		{"-", "", "", false},
	}
	for _, tc := range tests {
		id, p, ok := remotePath(tc.arg)
		if id != tc.id || p != tc.path || ok != tc.remote {
			t.Errorf("remotePath(%q) = %q %q %v", tc.arg, id, p, ok)
		}
	}
}

// TestExecAndCpErrors: against the real API server (fake VM backend), an
// unknown microVM, a relative guest path, two local paths and a missing
// local source each fail with a message saying what was wrong.
func TestExecAndCpErrors(t *testing.T) {
	dir := t.TempDir()
	_, url, _ := runHelper(t, dir)
	s := awscli.Settings{EndpointURL: url, Region: "us-east-1", Profile: "default", CredentialsFile: filepath.Join(dir, "credentials")}
	o := shellOptions{CAFile: filepath.Join(dir, "ca.pem"), Minutes: 5}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	devnull, _ := os.Open(os.DevNull)
	defer devnull.Close()

	_, err := runExec(ctx, s, "mvm-0123456789abcdef", o, execOptions{Argv: []string{"true"}, Stdin: devnull, Stdout: io.Discard, Stderr: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "mvm-0123456789abcdef") || !strings.Contains(err.Error(), "not found") {
		t.Errorf("exec in an unknown microvm: %v", err)
	}
	t.Logf("exec in an unknown microvm: %v", err)
	local := filepath.Join(dir, "local.txt")
	os.WriteFile(local, []byte("x"), 0o600)
	for _, tc := range []struct{ src, dst, want string }{
		{"mvm-0123456789abcdef:/etc/hostname", local, "not found"},
		{local, "mvm-0123456789abcdef:/tmp/x", "not found"},
		{"mvm-0123456789abcdef:etc/hostname", local, "absolute path"},
		{local, filepath.Join(dir, "other"), "exactly one of SRC and DST"},
		{filepath.Join(dir, "missing"), "mvm-0123456789abcdef:/tmp/x", "no such file or directory"},
	} {
		err := runCp(ctx, s, o, tc.src, tc.dst, devnull, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("cp %s %s: %v, want an error with %q", tc.src, tc.dst, err, tc.want)
		}
	}
}
