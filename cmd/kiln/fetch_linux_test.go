//go:build linux

package main

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

const hostSecret = "KILN-HOST-SECRET-91c2"

// TestServerRefusesHostFetches runs the real `kiln server` (engine
// backend) and creates images whose builds make kiln fetch from the host's
// network position: ADD of a loopback URL, ADD of the cloud metadata
// address, a code artifact URI on a loopback port, and ADD of a URL on a
// server the operator allowed (--allow-fetch-cidr) that redirects to
// loopback. Every build fails with "address ... is not allowed", the
// loopback servers get no request, and their content is nowhere in the
// data directory.
func TestServerRefusesHostFetches(t *testing.T) {
	testenv.NeedRoot(t, "the engine backend")
	kernel := "/var/lib/kiln/kernel"
	if _, err := os.Stat(filepath.Join(kernel, "vmlinuz")); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("no guest kernel: run `make setup`")
		}
		t.Skip("no guest kernel (run `make setup`)")
	}
	// Unix socket paths under the data directory must stay short.
	work, err := os.MkdirTemp("", "kfetch")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	data := filepath.Join(work, "d")
	if err := os.MkdirAll(filepath.Join(data, "bin"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := vmmtest.BuildAgent(filepath.Join(data, "bin")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(kernel, filepath.Join(data, "kernel")); err != nil {
		t.Fatal(err)
	}

	var hits atomic.Int64
	secret := listen(t, "127.0.0.1:0", func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if strings.HasSuffix(r.URL.Path, ".zip") {
			w.Write(zipOf(t, map[string]string{"Dockerfile": "FROM scratch\nCOPY s /s\n", "s": hostSecret}))
			return
		}
		io.WriteString(w, hostSecret)
	})
	mirror := listen(t, "127.0.0.2:0", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+secret+"/secret", http.StatusFound)
	})

	o := server.Options{Backend: "engine", DataDir: data, APIAddr: freeAddr(t), EndpointAddr: freeAddr(t), Domain: "microvm.localhost", Region: "us-east-1",
		AllowFetchCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.Run(ctx, o) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("server did not stop")
		}
	})
	waitTCP(t, o.APIAddr, done)

	creds, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	c := awscli.NewClient("http://"+o.APIAddr, "us-east-1", creds)

	pkg := func(name, dockerfile string) string {
		p := filepath.Join(work, name+".zip")
		if err := os.WriteFile(p, zipOf(t, map[string]string{"Dockerfile": dockerfile}), 0o644); err != nil {
			t.Fatal(err)
		}
		return (&url.URL{Scheme: "file", Path: p}).String()
	}
	tests := []struct {
		name, uri, want string
	}{
		{"add-loopback", pkg("a", "FROM scratch\nADD http://"+secret+"/secret /secret\n"), "address 127.0.0.1 is not allowed"},
		{"add-metadata", pkg("b", "FROM scratch\nADD http://169.254.169.254/latest/meta-data/iam/security-credentials/ /creds\n"), "address 169.254.169.254 is not allowed"},
		{"code-uri-loopback", "http://" + secret + "/code.zip", "address 127.0.0.1 is not allowed"},
		{"add-redirect", pkg("d", "FROM scratch\nADD http://"+mirror+"/latest /latest\n"), "address 127.0.0.1 is not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cctx, ccancel := context.WithTimeout(ctx, 2*time.Minute)
			defer ccancel()
			if _, err := awscli.Call(cctx, c, awscli.Find("CreateMicrovmImage"), map[string]any{"name": tt.name,
				"baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12", "buildRoleArn": "arn:aws:iam::123456789012:role/b",
				"codeArtifact": map[string]any{"uri": tt.uri}}); err != nil {
				t.Fatal(err)
			}
			for {
				v, err := awscli.Call(cctx, c, awscli.Find("GetMicrovmImageVersion"), map[string]any{"imageIdentifier": tt.name, "imageVersion": "1"})
				if err != nil {
					t.Fatal(err)
				}
				state, _ := v["state"].(string)
				if strings.HasSuffix(state, "FAILED") {
					reason, _ := v["stateReason"].(string)
					if !strings.Contains(reason, "fetching URL: "+tt.want+": kiln does not fetch from private, loopback, link-local or the host's own addresses") {
						t.Fatalf("stateReason = %q, want %q", reason, tt.want)
					}
					return
				}
				if state == "SUCCESSFUL" || state == "CREATED" {
					t.Fatalf("build succeeded: %v", v)
				}
				select {
				case <-cctx.Done():
					t.Fatalf("build still %s: %v", state, cctx.Err())
				case <-time.After(200 * time.Millisecond):
				}
			}
		})
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the loopback server answered %d requests", n)
	}
	filepath.WalkDir(data, func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(hostSecret)) {
				t.Errorf("host content in %s", p)
			}
		}
		return nil
	})
}

func listen(t *testing.T, addr string, h http.HandlerFunc) string {
	t.Helper()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func waitTCP(t *testing.T, addr string, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-done:
			t.Fatalf("server exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not listen within 60s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func zipOf(t *testing.T, files map[string]string) []byte {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Error(err)
		}
		io.WriteString(w, body)
	}
	zw.Close()
	return buf.Bytes()
}
