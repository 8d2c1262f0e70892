//go:build linux

package image

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image/source"
)

// secretMark is what the host-side servers below hand out: it must end up
// in no image, cache entry or build folder.
const secretMark = "KILN-HOST-SECRET-7f3a"

// loopbackAllowed is the client of an operator who allowed loopback
// fetches (--allow-fetch-cidr 127.0.0.0/8); tests use it to reach their
// own servers.
func loopbackAllowed() *http.Client {
	return (&egress.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}).Client(time.Minute)
}

// hostServer is a server the tenant must not reach through kiln: on addr
// ("127.0.0.1:0") it serves secretMark (or a zip holding it) and counts
// requests.
func hostServer(t *testing.T, addr string, h http.HandlerFunc) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	var hits atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if h != nil {
			h(w, r)
			return
		}
		io.WriteString(w, secretMark)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), &hits
}

func secretZip(w http.ResponseWriter, _ *http.Request) {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	f, _ := zw.Create("Dockerfile")
	io.WriteString(f, "FROM scratch\nCOPY secret.txt /\n")
	f, _ = zw.Create("secret.txt")
	io.WriteString(f, secretMark)
	zw.Close()
	w.Write(buf.Bytes())
}

// assertNowhere fails if secretMark is in any file under dirs.
func assertNowhere(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return nil
			}
			if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(secretMark)) {
				t.Errorf("host content found in %s", p)
			}
			return nil
		})
	}
}

const notAllowed = "is not allowed: kiln does not fetch from private, loopback, link-local or the host's own addresses"

// TestAddURLDenied builds Dockerfiles whose ADD names a host-side address.
// Every build fails at the ADD with "address ... is not allowed", the
// listener sees no request, and the content is in no output or cache.
func TestAddURLDenied(t *testing.T) {
	ctx := context.Background()
	secret, secretHits := hostServer(t, "127.0.0.1:0", nil)
	redirector, _ := hostServer(t, "127.0.0.2:0", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+secret+"/secret", http.StatusFound)
	})
	// An operator allowed 127.0.0.2 (a mirror, say): the redirect it sends
	// to 127.0.0.1 is still refused.
	allow2 := (&egress.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}).Client(time.Minute)
	tests := []struct {
		name   string
		url    string
		client *http.Client
		errHas string
	}{
		{"loopback", "http://" + secret + "/secret", nil, "address 127.0.0.1 " + notAllowed},
		{"cloud metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/", nil, "address 169.254.169.254 " + notAllowed},
		{"azure wire server", "http://168.63.129.16/machine?comp=goalstate", nil, "address 168.63.129.16 " + notAllowed},
		{"v4-mapped loopback", "http://[::ffff:127.0.0.1]:" + secret[strings.LastIndexByte(secret, ':')+1:] + "/secret", nil, "address 127.0.0.1 " + notAllowed},
		{"redirect from an allowed server", "http://" + redirector + "/go", allow2, "address 127.0.0.1 " + notAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, bctx := t.TempDir(), t.TempDir()
			writeFiles(t, bctx, map[string]string{"Dockerfile": "FROM scratch\nADD " + tt.url + " /stolen\n"})
			out := filepath.Join(t.TempDir(), "root.ext4")
			b := &Builder{DataDir: data, HTTPClient: tt.client}
			_, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out})
			if err == nil {
				t.Fatal("build succeeded")
			}
			if !errors.Is(err, egress.ErrNotAllowed) || !strings.Contains(err.Error(), "fetching URL: "+tt.errHas) {
				t.Fatalf("err = %v\nwant %q", err, tt.errHas)
			}
			if _, err := os.Stat(out); err == nil {
				t.Fatal("failed build left an output disk")
			}
			assertNowhere(t, data, filepath.Dir(out))
		})
	}
	if n := secretHits.Load(); n != 0 {
		t.Fatalf("the host server answered %d requests", n)
	}
}

// TestAddURLAllowedByOperator: the same ADD works when the operator
// allowed the address, so the refusals above are the policy's doing.
func TestAddURLAllowedByOperator(t *testing.T) {
	ctx := context.Background()
	secret, _ := hostServer(t, "127.0.0.1:0", nil)
	data, bctx := t.TempDir(), t.TempDir()
	writeFiles(t, bctx, map[string]string{"Dockerfile": "FROM scratch\nADD http://" + secret + "/secret /allowed\n"})
	out := filepath.Join(t.TempDir(), "root.ext4")
	if _, err := (&Builder{DataDir: data, HTTPClient: loopbackAllowed()}).Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out}); err != nil {
		t.Fatal(err)
	}
}

// TestCodeURIDenied: a code artifact URI on a loopback port is refused
// before any connection, with the same message, and builds nothing.
func TestCodeURIDenied(t *testing.T) {
	ctx := context.Background()
	code, hits := hostServer(t, "127.0.0.1:0", secretZip)
	closed := func() string { // a port nothing listens on: no "connection refused" oracle either
		ln, _ := net.Listen("tcp4", "127.0.0.1:0")
		defer ln.Close()
		return ln.Addr().String()
	}()
	for _, loc := range []string{"http://" + code + "/code.zip", "https://" + code + "/code.zip", "http://" + closed + "/code.zip", "http://localhost:" + code[strings.LastIndexByte(code, ':')+1:] + "/code.zip"} {
		t.Run(loc, func(t *testing.T) {
			data := t.TempDir()
			out := filepath.Join(t.TempDir(), "r.ext4")
			_, err := (&Builder{DataDir: data}).BuildSource(ctx, loc, source.Config{}, Request{Account: "test", Output: out})
			if !errors.Is(err, egress.ErrNotAllowed) || !strings.Contains(err.Error(), notAllowed) {
				t.Fatalf("err = %v, want address not allowed", err)
			}
			if strings.Contains(err.Error(), "refused") || strings.Contains(err.Error(), "EOF") {
				t.Fatalf("error tells what answered: %v", err)
			}
			if reason := FailureReason(err, nil); !strings.HasPrefix(reason, "fetch code package failed: downloading code package: fetching URL: address 127.0.0.1 "+notAllowed) {
				t.Fatalf("reason = %q", reason)
			}
			assertNowhere(t, data, filepath.Dir(out))
		})
	}
	if hits.Load() != 0 {
		t.Fatalf("the host server answered %d requests", hits.Load())
	}
}
