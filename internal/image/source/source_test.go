package source

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
)

func zipBytes(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(body))
	}
	zw.Close()
	return buf.Bytes()
}

var pkg = map[string]string{"Dockerfile": "FROM scratch\nCOPY app.txt /\n", "app.txt": "hello"}

func checkPkg(t *testing.T, dst string) {
	t.Helper()
	for name, want := range pkg {
		b, err := os.ReadFile(filepath.Join(dst, name))
		if err != nil || string(b) != want {
			t.Fatalf("%s = %q, %v", name, b, err)
		}
	}
	// Nothing but the package: the downloaded zip lives elsewhere.
	ents, _ := os.ReadDir(dst)
	if len(ents) != len(pkg) {
		t.Fatalf("build folder has %d entries, want %d", len(ents), len(pkg))
	}
}

func TestFetch(t *testing.T) {
	ctx := context.Background()
	work := t.TempDir()
	zipPath := filepath.Join(work, "code.zip")
	zb := zipBytes(t, pkg)
	os.WriteFile(zipPath, zb, 0o644)
	folder := filepath.Join(work, "folder")
	os.Mkdir(folder, 0o755)
	for n, b := range pkg {
		os.WriteFile(filepath.Join(folder, n), []byte(b), 0o644)
	}
	evil := filepath.Join(work, "evil")
	os.Mkdir(evil, 0o755)
	os.Symlink("/etc/passwd", filepath.Join(evil, "passwd"))

	mux := http.NewServeMux()
	mux.HandleFunc("/code.zip", func(w http.ResponseWriter, r *http.Request) { w.Write(zb) })
	mux.HandleFunc("/huge.zip", func(w http.ResponseWriter, r *http.Request) {
		// No Content-Length: the limit must hold on the streamed body.
		fl := w.(http.Flusher)
		for i := 0; i < 64; i++ {
			w.Write(make([]byte, 1024))
			fl.Flush()
		}
	})
	mux.HandleFunc("/slow.zip", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	mux.HandleFunc("/missing.zip", http.NotFound)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	backend := s3mem.New()
	s3srv := httptest.NewServer(gofakes3.New(backend).Server())
	defer s3srv.Close()
	s3cfg := &S3Config{Endpoint: s3srv.URL, AccessKeyID: "kiln", SecretAccessKey: "secret"}
	cl := NewS3Client(*s3cfg)
	if _, err := cl.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("code")}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("code"), Key: aws.String("apps/v1.zip"), Body: bytes.NewReader(zb)}); err != nil {
		t.Fatal(err)
	}

	local := Config{AllowLocal: true}
	// The test servers are on loopback, which tenants may not make kiln
	// fetch from; an operator's --allow-fetch-cidr opens it.
	lo := (&egress.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}).Client(0)
	redirector := httptest.NewUnstartedServer(http.RedirectHandler(srv.URL+"/code.zip", http.StatusFound))
	rl, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	redirector.Listener.Close()
	redirector.Listener = rl
	redirector.Start()
	defer redirector.Close()
	only2 := (&egress.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}).Client(0)
	tests := []struct {
		name     string
		location string
		cfg      Config
		wantErr  error
		errHas   string
	}{
		{name: "local zip", location: zipPath, cfg: local},
		{name: "local folder", location: folder, cfg: local},
		{name: "file uri", location: "file://" + zipPath, cfg: local},
		{name: "http", location: srv.URL + "/code.zip", cfg: Config{HTTPClient: lo}},
		{name: "http loopback refused", location: srv.URL + "/code.zip", wantErr: egress.ErrNotAllowed, errHas: "fetching URL: address 127.0.0.1 is not allowed"},
		{name: "http metadata refused", location: "http://169.254.169.254/latest/user-data", wantErr: egress.ErrNotAllowed, errHas: "address 169.254.169.254 is not allowed"},
		{name: "http redirect to loopback refused", location: redirector.URL + "/", cfg: Config{HTTPClient: only2}, wantErr: egress.ErrNotAllowed, errHas: "address 127.0.0.1 is not allowed"},
		{name: "s3 path style", location: "s3://code/apps/v1.zip", cfg: Config{S3: s3cfg}},
		{name: "local refused for tenants", location: zipPath, wantErr: ErrInvalid, errHas: "not allowed"},
		{name: "folder with link to host file", location: evil, cfg: local, wantErr: layer.ErrUnsafe, errHas: "outside the build folder"},
		{name: "unknown scheme", location: "ftp://x/y.zip", wantErr: ErrInvalid, errHas: "scheme"},
		{name: "http 404", location: srv.URL + "/missing.zip", cfg: Config{HTTPClient: lo}, errHas: "404"},
		{name: "http over size limit", location: srv.URL + "/huge.zip", cfg: Config{HTTPClient: lo, MaxDownloadBytes: 4096}, wantErr: layer.ErrLimit, errHas: "MaxDownloadBytes"},
		{name: "http timeout", location: srv.URL + "/slow.zip", cfg: Config{HTTPClient: lo, Timeout: 200 * time.Millisecond}, errHas: "timed out"},
		{name: "s3 not configured", location: "s3://code/apps/v1.zip", wantErr: ErrInvalid, errHas: "no S3 endpoint"},
		{name: "s3 missing key", location: "s3://code/nope.zip", cfg: Config{S3: s3cfg}, errHas: "NoSuchKey"},
		{name: "s3 over size limit", location: "s3://code/apps/v1.zip", cfg: Config{S3: s3cfg, MaxDownloadBytes: 10}, wantErr: layer.ErrLimit},
		{name: "not a zip", location: filepath.Join(folder, "app.txt"), cfg: local, wantErr: ErrInvalid, errHas: "neither a folder nor a zip"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "build")
			os.Mkdir(dst, 0o755)
			err := Fetch(ctx, tt.location, dst, tt.cfg)
			if tt.wantErr == nil && tt.errHas == "" {
				if err != nil {
					t.Fatal(err)
				}
				checkPkg(t, dst)
				return
			}
			if err == nil {
				t.Fatal("want error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("err %q does not mention %q", err, tt.errHas)
			}
			// No download left beside the build folder.
			if m, _ := filepath.Glob(filepath.Join(filepath.Dir(dst), ".download-*")); len(m) > 0 {
				t.Fatalf("download left behind: %v", m)
			}
		})
	}
}
