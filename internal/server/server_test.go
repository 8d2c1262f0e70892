package server

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/console"
)

// TestNewServesAndStops assembles a whole server on the fake backend (no
// VMs): the admin key is written, the API, console and E2B routes answer
// on the one listener, and Serve returns once its context ends.
func TestNewServesAndStops(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := New(ctx, Options{Backend: "fake", DataDir: dir, APIAddr: "127.0.0.1:0", Domain: "microvm.localhost", Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }()
	if s.Store == nil || s.API == nil || s.Backend == nil || s.Engine != nil || !strings.HasPrefix(s.APIURL, "http://127.0.0.1:") {
		t.Fatalf("server parts: %+v", s)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "credentials")); err != nil || !strings.Contains(string(b), "aws_secret_access_key") {
		t.Errorf("admin credentials: %v %q", err, b)
	}
	for path, want := range map[string]int{
		// 0: mounted, whatever it says (503 until make build made its
		// assets).
		console.Prefix:         0,
		"/2025-09-09/microvms": http.StatusForbidden, // unsigned: the AWS API's answer
		"/sandboxes":           http.StatusUnauthorized,
	} {
		resp, err := http.Get(s.APIURL + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != want && (want != 0 || resp.StatusCode == http.StatusNotFound) {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
}

// TestNewRefusesContradictions: options that cannot work are refused
// before the store is even opened.
func TestNewRefusesContradictions(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"unknown backend", Options{Backend: "vmware"}, `unknown backend "vmware"`},
		{"half TLS", Options{Backend: "fake", APICert: "c.pem"}, "--api-cert and --api-key go together"},
		{"operator", Options{Backend: "fake", OperatorAccount: "12345"}, "12-digit account id"},
		{"kvm on fake", Options{Backend: "fake", RequireKVM: true}, "the fake backend runs no VMs under KVM"},
		{"node", Options{Role: "node"}, "use Run"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.o.DataDir = filepath.Join(dir, "data")
			_, err := New(context.Background(), tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if _, err := os.Stat(tc.o.DataDir); err == nil {
				t.Error("the data directory was made although the options were refused")
			}
		})
	}
}

func TestValidAccount(t *testing.T) {
	for s, want := range map[string]bool{"123456789012": true, "12345678901": false, "12345678901a": false, "": false, "1234567890123": false} {
		if got := ValidAccount(s); got != want {
			t.Errorf("ValidAccount(%q) = %v", s, got)
		}
	}
}
