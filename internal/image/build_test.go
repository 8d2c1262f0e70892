//go:build linux

package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// fakeRunner stands in for the build microVM: it applies a Go function to
// the root on the step's disk (mounted), or diskFn to the disk itself, so
// the builder's disk handling (sizes, mounts, caching) is exercised for
// real.
type fakeRunner struct {
	mu     sync.Mutex
	calls  []RunStep
	fn     func(root string, step RunStep) error
	diskFn func(disk string) error
}

func (f *fakeRunner) Run(ctx context.Context, disk string, step RunStep, log io.Writer) (string, error) {
	f.mu.Lock()
	f.calls = append(f.calls, step)
	f.mu.Unlock()
	fmt.Fprintf(log, "fake vm: %s\n", strings.Join(step.Args, " "))
	if f.diskFn != nil {
		return disk, f.diskFn(disk)
	}
	return disk, rootfs.Edit(ctx, disk, func(dir string) error { return f.fn(dir, step) })
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func tgz(t *testing.T, files map[string]string) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	return buf.Bytes()
}

// downloadServer serves "downloaded" for ADD of a URL.
func downloadServer(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "downloaded")
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestBuild(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	ctx := context.Background()
	srv := downloadServer(t)

	data := t.TempDir()
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": `ARG GREETING=hello
FROM scratch AS build
ARG GREETING
COPY etc/ /etc/
COPY src/ /src/
RUN make-app
FROM build AS unused
RUN never
FROM scratch
COPY etc/passwd etc/group /etc/
COPY rootlinks/ /
COPY src/notes.txt /var/run/notes.txt
COPY --from=build /out/app /usr/local/bin/app
COPY --chown=app:staff src/*.txt /data/
ADD vendor.tar.gz /opt/vendor/
ADD ` + srv.URL + `/dl/file.bin /opt/
ENV APP_HOME=/srv/app PATH=/srv/app/bin:$PATH
WORKDIR $APP_HOME
USER app
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["/usr/local/bin/app", "--port", "8080"]
`,
		".dockerignore":  "src/secret.txt\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv/app:/bin/sh\n",
		"etc/group":      "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
		"src/main.c":     "int main(){}",
		"src/notes.txt":  "notes",
		"src/secret.txt": "do not ship",
	})
	os.MkdirAll(filepath.Join(bctx, "rootlinks/var"), 0o755)
	os.MkdirAll(filepath.Join(bctx, "rootlinks/run"), 0o755)
	os.Symlink("/run", filepath.Join(bctx, "rootlinks/var/run"))
	os.WriteFile(filepath.Join(bctx, "vendor.tar.gz"), tgz(t, map[string]string{"lib/v.txt": "vendored"}), 0o644)

	runner := &fakeRunner{fn: func(root string, step RunStep) error {
		src, err := os.ReadFile(filepath.Join(root, "src/main.c"))
		if err != nil {
			return err
		}
		os.MkdirAll(filepath.Join(root, "out"), 0o755)
		env := strings.Join(step.Env, ",")
		return os.WriteFile(filepath.Join(root, "out/app"), []byte("built from "+string(src)+" with "+env), 0o755)
	}}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 16 << 20, HTTPClient: loopbackAllowed()}
	var log bytes.Buffer
	out := filepath.Join(t.TempDir(), "root.ext4")
	res, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log})
	if err != nil {
		t.Fatalf("build: %v\nlog:\n%s", err, log.String())
	}
	if len(runner.calls) != 1 {
		t.Fatalf("runner called %d times, want 1 (the unused stage must not build)", len(runner.calls))
	}
	if got := runner.calls[0]; !reflect.DeepEqual(got.Args, []string{"/bin/sh", "-c", "make-app"}) || !contains(got.Env, "GREETING=hello") || got.WorkDir != "/" {
		t.Fatalf("run step = %+v", got)
	}

	files := []struct {
		name, path, want string
		uid, gid         int
	}{
		{name: "file built by RUN in another stage", path: "/usr/local/bin/app", want: "built from int main(){} with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin,GREETING=hello"},
		{name: "glob copy with chown by name", path: "/data/notes.txt", want: "notes", uid: 1000, gid: 50},
		{name: "ADD unpacks a local tar.gz", path: "/opt/vendor/lib/v.txt", want: "vendored"},
		{name: "ADD fetches a URL", path: "/opt/file.bin", want: "downloaded"},
		{name: "COPY through an absolute link lands inside the root", path: "/run/notes.txt", want: "notes"},
	}
	for _, tt := range files {
		t.Run(tt.name, func(t *testing.T) {
			got, err := rootfs.ReadFile(ctx, out, tt.path, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Fatalf("%s = %q, want %q", tt.path, got, tt.want)
			}
			if os.Geteuid() == 0 {
				fi, _ := rootfs.Stat(ctx, out, tt.path)
				if fi.UID != tt.uid || fi.GID != tt.gid {
					t.Fatalf("owner %d:%d, want %d:%d", fi.UID, fi.GID, tt.uid, tt.gid)
				}
			}
		})
	}
	if _, err := rootfs.ReadFile(ctx, out, "/data/secret.txt", 1<<20); err == nil {
		t.Fatal(".dockerignore'd file was copied")
	}
	if fi, err := rootfs.Stat(ctx, out, "/srv/app"); err != nil || fi.Mode&0o170000 != 0o040000 {
		t.Fatalf("WORKDIR not created: %+v %v", fi, err)
	}
	wantCfg := Config{
		Env:          []string{"PATH=/srv/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "APP_HOME=/srv/app"},
		User:         "app",
		WorkingDir:   "/srv/app",
		Cmd:          []string{"/usr/local/bin/app", "--port", "8080"},
		ExposedPorts: []string{"8080/tcp"},
		StopSignal:   "SIGTERM",
	}
	if !reflect.DeepEqual(res.Config, wantCfg) {
		t.Fatalf("config = %+v\nwant %+v", res.Config, wantCfg)
	}
	if fi, _ := os.Stat(out); fi.Mode().Perm() != 0o444 {
		t.Fatalf("final disk mode %v, want read-only", fi.Mode())
	}

	// An unchanged rebuild reuses every step.
	out2 := filepath.Join(t.TempDir(), "root.ext4")
	res2, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out2})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range res2.Steps {
		if !s.Cached {
			t.Errorf("rebuild: step %q (line %d) not cached", s.Instruction, s.Line)
		}
	}
	if len(runner.calls) != 1 || res2.Key != res.Key {
		t.Fatalf("rebuild ran RUN again (%d calls) or changed key", len(runner.calls))
	}

	// Changing a source re-runs the COPY and the RUN after it; an ignored
	// file changing does not.
	writeFiles(t, bctx, map[string]string{"src/secret.txt": "changed secret"})
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out2}); err != nil {
		t.Fatal(err)
	}
	if len(runner.calls) != 1 {
		t.Fatalf("ignored file change re-ran RUN")
	}
	writeFiles(t, bctx, map[string]string{"src/main.c": "int main(){return 1;}"})
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out2}); err != nil {
		t.Fatal(err)
	}
	if len(runner.calls) != 2 {
		t.Fatalf("source change: runner calls = %d, want 2", len(runner.calls))
	}
	got, _ := rootfs.ReadFile(ctx, out2, "/usr/local/bin/app", 1<<20)
	if !strings.Contains(string(got), "return 1") {
		t.Fatalf("rebuilt app = %q", got)
	}
	checkNoWork(t, data)
}

// blockRunner is a build VM whose command never ends: only cancellation
// stops it.
type blockRunner struct{}

func (blockRunner) Run(ctx context.Context, disk string, step RunStep, log io.Writer) (string, error) {
	<-ctx.Done()
	return "", ctx.Err()
}

func evilTar() string {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "../../escaped", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
	tw.Write([]byte("x"))
	tw.Close()
	return buf.String()
}

func checkNoWork(t *testing.T, data string) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(data, "tmp"))
	if len(ents) != 0 {
		t.Fatalf("work files left behind: %v", ents)
	}
	for _, pat := range []string{"image-cache/accounts/*/.tmp*", "image-cache/shared/.tmp*", "image-cache/.tmp*"} {
		if left, _ := filepath.Glob(filepath.Join(data, pat)); len(left) > 0 {
			t.Fatalf("half-written cache entries left: %v", left)
		}
	}
}

func TestBuildFailures(t *testing.T) {
	ctx := context.Background()
	fail := &fakeRunner{fn: func(string, RunStep) error { return fmt.Errorf("RUN: %w", &ExitError{Code: 2}) }}
	tests := []struct {
		name    string
		files   map[string]string
		runner  Runner
		wantErr error
		errHas  string
	}{
		{name: "no Dockerfile", files: map[string]string{"app.py": ""}, wantErr: ErrInvalid, errHas: "no Dockerfile"},
		{name: "unsupported instruction", files: map[string]string{"Dockerfile": "FROM scratch\nHEALTHCHECK NONE\n"}, errHas: "line 2: HEALTHCHECK is not supported"},
		{name: "run exits non-zero", files: map[string]string{"Dockerfile": "FROM scratch\nCOPY a /a\nRUN false\n", "a": "x"}, runner: fail, errHas: `step "RUN false" (line 3)`},
		{name: "missing copy source", files: map[string]string{"Dockerfile": "FROM scratch\nCOPY nope /x\n"}, wantErr: ErrInvalid, errHas: "line 2"},
		{name: "copy source escapes context", files: map[string]string{"Dockerfile": "FROM scratch\nCOPY ../../etc/passwd /x\n"}, wantErr: ErrInvalid, errHas: `".."`},
		{name: "unknown user", files: map[string]string{"Dockerfile": "FROM scratch\nUSER ghost\nRUN true\n"}, runner: fail, wantErr: ErrInvalid, errHas: "user \"ghost\" not found"},
		{name: "hostile tar in ADD", files: map[string]string{"Dockerfile": "FROM scratch\nADD evil.tar /\n", "evil.tar": evilTar()}, wantErr: layer.ErrUnsafe, errHas: `".."`},
		{name: "cancelled during RUN", files: map[string]string{"Dockerfile": "FROM scratch\nRUN sleep 100\n"}, runner: blockRunner{}, wantErr: context.Canceled, errHas: "line 2"},
		{name: "base without resolver", files: map[string]string{"Dockerfile": "FROM debian:12\n"}, errHas: "no base resolver"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := t.TempDir()
			bctx := t.TempDir()
			writeFiles(t, bctx, tt.files)
			out := filepath.Join(t.TempDir(), "root.ext4")
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if _, ok := tt.runner.(blockRunner); ok {
				go func() { time.Sleep(200 * time.Millisecond); cancel() }()
			}
			_, err := (&Builder{DataDir: data, Runner: tt.runner, RunHeadroom: 8 << 20}).Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out})
			if err == nil {
				t.Fatal("want error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.errHas) {
				t.Fatalf("err %q does not mention %q", err, tt.errHas)
			}
			if _, err := os.Stat(out); err == nil {
				t.Fatal("failed build left an output disk")
			}
			checkNoWork(t, data)
		})
	}
}

func TestBuildSourceAndFailureReason(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	ctx := context.Background()
	data := t.TempDir()
	pkg := t.TempDir()
	writeFiles(t, pkg, map[string]string{"Dockerfile": "FROM scratch\nCOPY app.txt /\nRUN make\n", "app.txt": "x"})
	runner := &fakeRunner{fn: func(string, RunStep) error { return &ExitError{Code: 2} }}
	tail := NewLogTail(5)
	_, err := (&Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20}).BuildSource(ctx, pkg, sourceConfigLocal(), Request{Account: "test", Output: filepath.Join(t.TempDir(), "r.ext4"), Log: tail})
	if err == nil {
		t.Fatal("want error")
	}
	reason := FailureReason(err, tail)
	for _, want := range []string{"RUN make failed at line 3", "status 2", "last lines of the build log", "fake vm: /bin/sh -c make"} {
		if !strings.Contains(reason, want) {
			t.Errorf("reason lacks %q:\n%s", want, reason)
		}
	}
	checkNoWork(t, data)

	_, err = (&Builder{DataDir: data}).BuildSource(ctx, "ftp://nowhere/x.zip", sourceConfigLocal(), Request{Account: "test", Output: filepath.Join(t.TempDir(), "r.ext4")})
	if reason := FailureReason(err, nil); !strings.HasPrefix(reason, "fetch code package failed") {
		t.Fatalf("reason = %q", reason)
	}
	checkNoWork(t, data)
}

// TestCopyChmod: --chmod gives its mode to what the step copied and to
// nothing else (not files an earlier step put in the same folder, nor the
// folder copied into), keeps setuid and sticky bits, applies to ADD of a
// URL, and a mode over 7777 is refused.
func TestCopyChmod(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	ctx := context.Background()
	srv := downloadServer(t)
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY a/ /d/\nCOPY --chmod=700 b/ /d/\nCOPY --chmod=4755 x /bin/x\nCOPY --chmod=1777 a/old /tmp/sticky\n" +
			"ADD --chmod=751 " + srv.URL + "/u /opt/u\n",
		"a/old": "old", "b/new": "new", "b/sub/deep": "deep", "x": "x",
	})
	b := &Builder{DataDir: t.TempDir(), HTTPClient: loopbackAllowed()}
	out := filepath.Join(t.TempDir(), "root.ext4")
	var log bytes.Buffer
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log}); err != nil {
		t.Fatalf("build: %v\nlog:\n%s", err, log.String())
	}
	for p, want := range map[string]uint32{"/d/old": 0o644, "/d": 0o755, "/d/new": 0o700, "/d/sub": 0o700, "/d/sub/deep": 0o700,
		"/bin/x": 0o4755, "/tmp/sticky": 0o1777, "/opt/u": 0o751} {
		fi, err := rootfs.Stat(ctx, out, p)
		if err != nil {
			t.Fatal(err)
		}
		if got := uint32(fi.Mode) & 0o7777; got != want {
			t.Errorf("%s: mode %04o, want %04o", p, got, want)
		}
	}
	writeFiles(t, bctx, map[string]string{"Dockerfile": "FROM scratch\nCOPY --chmod=17777 x /x\n"})
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log}); err == nil || !strings.Contains(err.Error(), "up to 7777") {
		t.Errorf("--chmod=17777: %v", err)
	}
}

// TestAddCompressedNonTar: ADD unpacks a local file only if it is a tar
// once decompressed; a gzipped JSON, or a text that begins as bzip2 does,
// is copied as it is.
func TestAddCompressedNonTar(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools and FUSE mounts")
	ctx := context.Background()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"a":1}`))
	zw.Close()
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch\nADD data.json.gz /d/\nADD bzh.txt /t/\nADD v.tar.gz /v/\n",
		"bzh.txt":    "BZh is how this note begins",
	})
	os.WriteFile(filepath.Join(bctx, "data.json.gz"), gz.Bytes(), 0o644)
	os.WriteFile(filepath.Join(bctx, "v.tar.gz"), tgz(t, map[string]string{"lib/v.txt": "vendored"}), 0o644)
	b := &Builder{DataDir: t.TempDir()}
	out := filepath.Join(t.TempDir(), "root.ext4")
	var log bytes.Buffer
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log}); err != nil {
		t.Fatalf("build: %v\nlog:\n%s", err, log.String())
	}
	for p, want := range map[string]string{"/d/data.json.gz": gz.String(), "/t/bzh.txt": "BZh is how this note begins", "/v/lib/v.txt": "vendored"} {
		if got, err := rootfs.ReadFile(ctx, out, p, 1<<20); err != nil || string(got) != want {
			t.Errorf("%s = %q (%v), want %q", p, got, err, want)
		}
	}
}
