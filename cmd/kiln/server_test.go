package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/server"
)

// TestHelperServer is not a test: it is the server process the crash test
// starts (the test binary re-executed) and kills with SIGKILL.
func TestHelperServer(t *testing.T) {
	dir := os.Getenv("KILN_HELPER_SERVER")
	if dir == "" {
		t.Skip("helper process only")
	}
	o := server.Options{DataDir: dir, APIAddr: os.Getenv("KILN_HELPER_ADDR"), EndpointAddr: "127.0.0.1:8443", Domain: "microvm.localhost", Region: "us-east-1"}
	// Further options (TLS, caps) as JSON over o.
	if j := os.Getenv("KILN_HELPER_OPTS"); j != "" {
		if err := json.Unmarshal([]byte(j), &o); err != nil {
			t.Fatal(err)
		}
	}
	o.Backend = "fake"
	if b := os.Getenv("KILN_HELPER_BACKEND"); b != "" {
		o.Backend = b
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := server.Run(ctx, o); err != nil {
		t.Fatal(err)
	}
}

// startServer runs `kiln server --backend fake` in a child process and
// returns its API URL once it serves.
func startServer(t *testing.T, dir, addr string, env ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd, line := startServerLine(t, dir, addr, env...)
	return cmd, strings.Fields(line[strings.Index(line, "http"):])[0]
}

// startServerLine is startServer returning the whole start-up line.
// env adds KILN_HELPER_OPTS (server.Options as JSON) or
// KILN_HELPER_BACKEND.
func startServerLine(t *testing.T, dir, addr string, env ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperServer$")
	cmd.Env = append(append(os.Environ(), "KILN_HELPER_SERVER="+dir, "KILN_HELPER_ADDR="+addr), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "kiln API serving at ") {
				lines <- sc.Text()
			}
		}
	}()
	select {
	case l := <-lines:
		return cmd, l
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatal("server did not print its URL")
	}
	return nil, ""
}

func TestServerSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts server processes")
	}
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	srv, url := startServer(t, dir, addr)
	defer func() { srv.Process.Kill(); srv.Wait() }()

	fi, err := os.Stat(filepath.Join(dir, "credentials"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file: %v, %v", fi, err)
	}
	creds, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	c := awscli.NewClient(url, "us-east-1", creds)
	ctx := context.Background()
	call := func(op string, in map[string]any) map[string]any {
		t.Helper()
		out, err := awscli.Call(ctx, c, awscli.Find(op), in)
		if err != nil {
			t.Fatalf("%s: %v", op, err)
		}
		return out
	}
	call("CreateMicrovmImage", map[string]any{"name": "app", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]any{"uri": "s3://kiln-test/x.zip"}})
	waitState := func(op, key, id, want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			out, err := awscli.Call(ctx, c, awscli.Find(op), map[string]any{key: id})
			if err == nil && out["state"] == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s: want %s, got %v %v", op, id, want, out["state"], err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitState("GetMicrovmImage", "imageIdentifier", "app", "CREATED")
	running := call("RunMicrovm", map[string]any{"imageIdentifier": "app"})["microvmId"].(string)
	waitState("GetMicrovm", "microvmIdentifier", running, "RUNNING")

	// Accept two transitions and kill the server before the backend (200 ms
	// delay) finishes them.
	pending := call("RunMicrovm", map[string]any{"imageIdentifier": "app"})["microvmId"].(string)
	call("SuspendMicrovm", map[string]any{"microvmIdentifier": running})
	srv.Process.Signal(syscall.SIGKILL)
	srv.Wait()

	srv2, url2 := startServer(t, dir, addr)
	defer func() { srv2.Process.Kill(); srv2.Wait() }()
	if url2 != url {
		t.Fatalf("restarted at %s, was %s", url2, url)
	}
	waitState("GetMicrovm", "microvmIdentifier", pending, "RUNNING")
	waitState("GetMicrovm", "microvmIdentifier", running, "SUSPENDED")
	// The admin key was made once: the file still works.
	b, err := os.ReadFile(filepath.Join(dir, "credentials"))
	if err != nil || !strings.Contains(string(b), creds.AccessKeyID) {
		t.Errorf("credentials rewritten on restart: %s", b)
	}
	l := call("ListMicrovms", map[string]any{})
	raw, _ := json.Marshal(l)
	if strings.Count(string(raw), "microvmId") != 2 {
		t.Errorf("ListMicrovms after restart: %s", raw)
	}
}
