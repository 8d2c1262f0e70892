//go:build linux

package client_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/guest"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// fakeSystem records the privileged calls a guest would make.
type fakeSystem struct {
	mu    sync.Mutex
	calls []string
}

func (f *fakeSystem) rec(s string) {
	f.mu.Lock()
	f.calls = append(f.calls, s)
	f.mu.Unlock()
}
func (f *fakeSystem) Freeze(context.Context) error { f.rec("freeze"); return nil }
func (f *fakeSystem) Thaw(context.Context) error   { f.rec("thaw"); return nil }
func (f *fakeSystem) Reseed(e []byte) error        { f.rec(fmt.Sprintf("reseed %d", len(e))); return nil }
func (f *fakeSystem) SetClock(t time.Time) error {
	f.rec(fmt.Sprintf("clock %d", t.UnixNano()))
	return nil
}
func (f *fakeSystem) SetHostname(n string) error { f.rec("hostname " + n); return nil }
func (f *fakeSystem) KillAll(sig int) error      { f.rec(fmt.Sprintf("killall %d", sig)); return nil }
func (f *fakeSystem) PowerOff() error            { f.rec("poweroff"); return nil }
func (f *fakeSystem) Running() int               { return 0 }
func (f *fakeSystem) get() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

var (
	reapOnce sync.Once
	server   *guest.Server
	sys      = &fakeSystem{}
)

// sharedServer returns one guest server for the test binary: it owns
// wait4(-1) for the process, so there must be only one.
func sharedServer() *guest.Server {
	reapOnce.Do(func() {
		server = guest.NewServer(guest.Config{System: sys, ExitGrace: 200 * time.Millisecond})
		go server.Reap(context.Background())
	})
	return server
}

// connect serves a fresh session over a socketpair and returns its client.
func connect(t *testing.T) *client.Client {
	t.Helper()
	testenv.NeedRoot(t, "the guest agent runs commands as other users")
	hostSide, guestSide := socketpair(t)
	srv := sharedServer()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _ = srv.Serve(ctx, guestSide, guestSide) }()
	t.Cleanup(func() {
		cancel()
		guestSide.Close()
	})
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ccancel()
	c, err := client.New(cctx, hostSide, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		ch <- c
	}()
	a, err := net.Dial("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	return a, <-ch
}

func run(t *testing.T, c *client.Client, req client.ExecRequest) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stdout, stderr, code, err := c.Run(ctx, req)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	return stdout, stderr, code
}

func TestExec(t *testing.T) {
	c := connect(t)
	tests := []struct {
		name       string
		req        client.ExecRequest
		wantOut    string
		wantErr    string
		wantCode   int
		wantFailed bool
	}{
		{name: "stdout and exit code", req: client.ExecRequest{Argv: []string{"/bin/sh", "-c", "echo hello; exit 3"}}, wantOut: "hello\n", wantCode: 3},
		{name: "stderr", req: client.ExecRequest{Argv: []string{"sh", "-c", "echo oops >&2"}}, wantErr: "oops\n"},
		{name: "env and cwd", req: client.ExecRequest{Argv: []string{"sh", "-c", "echo $FOO; pwd"}, Env: []string{"FOO=bar"}, Cwd: "/tmp"}, wantOut: "bar\n/tmp\n"},
		{name: "default path", req: client.ExecRequest{Argv: []string{"sh", "-c", "echo $PATH"}}, wantOut: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"},
		{name: "user by uid", req: client.ExecRequest{Argv: []string{"id", "-u"}, User: "65534"}, wantOut: "65534\n"},
		{name: "user and group", req: client.ExecRequest{Argv: []string{"sh", "-c", "id -u; id -g"}, User: "nobody:1234"}, wantOut: "65534\n1234\n"},
		{name: "killed by signal", req: client.ExecRequest{Argv: []string{"sh", "-c", "kill -9 $$"}}, wantCode: 137},
		{name: "tty", req: client.ExecRequest{Argv: []string{"sh", "-c", "test -t 1 && echo tty"}, TTY: true}, wantOut: "tty\r\n"},
		{name: "missing binary", req: client.ExecRequest{Argv: []string{"no-such-binary-kiln"}}, wantFailed: true},
		{name: "unknown user", req: client.ExecRequest{Argv: []string{"true"}, User: "no-such-user-kiln"}, wantFailed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.wantFailed {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if _, err := c.Exec(ctx, tt.req); err == nil {
					t.Fatal("Exec succeeded, want error")
				}
				return
			}
			out, errOut, code := run(t, c, tt.req)
			if out != tt.wantOut || errOut != tt.wantErr || code != tt.wantCode {
				t.Errorf("got out=%q err=%q code=%d, want out=%q err=%q code=%d", out, errOut, code, tt.wantOut, tt.wantErr, tt.wantCode)
			}
		})
	}
}

func TestConcurrentExecs(t *testing.T) {
	c := connect(t)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _, code := run(t, c, client.ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("echo %d; exit %d", i, i)}})
			if out != fmt.Sprintf("%d\n", i) || code != i {
				t.Errorf("exec %d: out=%q code=%d", i, out, code)
			}
		}()
	}
	wg.Wait()
}

func TestStdin(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "cat; echo done"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("x"), 200<<10)
	if err := p.Write(ctx, big); err != nil {
		t.Fatal(err)
	}
	if err := p.CloseStdin(ctx); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for o := range p.Output() {
		out.Write(o.Data)
	}
	if code, err := p.Wait(ctx); err != nil || code != 0 {
		t.Fatalf("Wait: %d %v", code, err)
	}
	if want := string(big) + "done\n"; out.String() != want {
		t.Fatalf("got %d bytes, want %d", out.Len(), len(want))
	}
}

func TestSignal(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(ctx, 15); err != nil {
		t.Fatal(err)
	}
	if code, err := p.Wait(ctx); err != nil || code != 128+15 {
		t.Fatalf("Wait: code %d, err %v; want 143", code, err)
	}
}

func TestBackgroundLogs(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "echo app started; exit 7"}, Background: true})
	if err != nil {
		t.Fatal(err)
	}
	var got string
	var exit *int
	for exit == nil {
		select {
		case r := <-c.Logs():
			if r.ExecID != p.ID() {
				continue
			}
			got += string(r.Data)
			exit = r.ExitCode
		case <-ctx.Done():
			t.Fatalf("no exit log record; got %q", got)
		}
	}
	if got != "app started\n" || *exit != 7 {
		t.Fatalf("logs %q exit %d", got, *exit)
	}
	if code, err := p.Wait(ctx); err != nil || code != 7 {
		t.Fatalf("Wait: %d %v", code, err)
	}
}

func TestOutputFloodIsBounded(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// 64 MiB of output that nobody reads until the end: the guest and the
	// client drop old chunks instead of buffering it all.
	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "head -c 67108864 /dev/zero; echo end"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Exited()
	var n int
	var last []byte
	for o := range p.Output() {
		n += len(o.Data)
		last = o.Data
	}
	if code, err := p.Wait(ctx); err != nil || code != 0 {
		t.Fatalf("Wait: %d %v", code, err)
	}
	if n > 17<<20 {
		t.Errorf("buffered %d bytes, want bounded", n)
	}
	if p.Dropped() == 0 {
		t.Errorf("Dropped() = 0, want > 0")
	}
	if !bytes.HasSuffix(last, []byte("end\n")) {
		t.Errorf("last chunk does not end the output: %q", last[max(0, len(last)-8):])
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after flood: %v", err)
	}
}

func TestFreezeRestoreShutdown(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before := len(sys.get())
	if err := c.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"true"}}); err == nil {
		t.Fatal("Exec while frozen succeeded")
	}
	if err := c.Restore(ctx, client.RestoreRequest{Entropy: make([]byte, 16), UnixNano: 1}); err == nil {
		t.Fatal("Restore with 16 bytes of entropy succeeded")
	}
	if err := c.Restore(ctx, client.RestoreRequest{Entropy: make([]byte, 32), UnixNano: 42, Hostname: "vm-1"}); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(sys.get()[before:], ",")
	if want := "freeze,reseed 32,clock 42,hostname vm-1,thaw"; got != want {
		t.Fatalf("system calls %q, want %q", got, want)
	}

	p, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sleep", "60"}})
	if err != nil {
		t.Fatal(err)
	}
	before = len(sys.get())
	if err := c.ShutdownGrace(ctx, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if code, err := p.Wait(ctx); err != nil || code != 128+15 {
		t.Fatalf("workload after shutdown: code %d, err %v; want SIGTERM", code, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for !strings.HasSuffix(strings.Join(sys.get(), ","), "poweroff") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	got = strings.Join(sys.get()[before:], ",")
	if want := "thaw,killall 15,killall 9,poweroff"; got != want {
		t.Fatalf("system calls %q, want %q", got, want)
	}
}

func TestWaitPortAndHTTP(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	if err := c.WaitPort(ctx, port, 100*time.Millisecond); err == nil {
		t.Fatal("WaitPort on a closed port succeeded")
	}
	l, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.URL.Path == "/big" {
			w.Write(bytes.Repeat([]byte("y"), proto.MaxHTTPBody+100))
			return
		}
		w.WriteHeader(201)
		fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, b)
	})}
	go srv.Serve(l)
	defer srv.Close()
	if err := c.WaitPort(ctx, port, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	status, body, err := c.HTTP(ctx, port, "POST", "/hook", []byte("{}"), 2*time.Second)
	if err != nil || status != 201 || string(body) != "POST /hook {}" {
		t.Fatalf("HTTP: %d %q %v", status, body, err)
	}
	_, body, err = c.HTTP(ctx, port, "GET", "/big", nil, 2*time.Second)
	if err != nil || len(body) != proto.MaxHTTPBody {
		t.Fatalf("HTTP big: %d bytes, %v", len(body), err)
	}
}

func TestCopyInOut(t *testing.T) {
	c := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	big := bytes.Repeat([]byte("0123456789"), 150_000) // spans several chunks
	files := map[string][]byte{"app/a.txt": []byte("hello"), "app/sub/big.bin": big}
	tw.WriteHeader(&tar.Header{Name: "app/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "app/sub/", Typeflag: tar.TypeDir, Mode: 0o700})
	for _, name := range []string{"app/a.txt", "app/sub/big.bin"} {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o640, Size: int64(len(files[name]))})
		tw.Write(files[name])
	}
	tw.WriteHeader(&tar.Header{Name: "app/link", Typeflag: tar.TypeSymlink, Linkname: "a.txt"})
	tw.WriteHeader(&tar.Header{Name: "../escape.txt", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1})
	tw.Write([]byte("x"))
	tw.Close()

	dst := filepath.Join(t.TempDir(), "dst")
	if err := c.CopyIn(ctx, dst, &buf); err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(dst, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes, err %v", name, len(got), err)
		}
	}
	if fi, err := os.Stat(filepath.Join(dst, "app/sub")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("app/sub mode: %v %v", fi.Mode(), err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "app/link")); err != nil || l != "a.txt" {
		t.Fatalf("link: %q %v", l, err)
	}
	if _, err := os.Stat(filepath.Join(dst, "escape.txt")); err != nil {
		t.Fatalf("../escape.txt was not confined to dst: %v", err)
	}

	var out bytes.Buffer
	if err := c.CopyOut(ctx, filepath.Join(dst, "app"), &out); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&out)
	seen := map[string]bool{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		seen[h.Name] = true
		if want, ok := files[h.Name]; ok {
			got, _ := io.ReadAll(tr)
			if !bytes.Equal(got, want) {
				t.Errorf("%s: %d bytes back, want %d", h.Name, len(got), len(want))
			}
		}
	}
	for _, n := range []string{"app/", "app/a.txt", "app/sub/", "app/sub/big.bin", "app/link"} {
		if !seen[n] {
			t.Errorf("CopyOut lacks %s (has %v)", n, seen)
		}
	}
	if err := c.CopyOut(ctx, "/no/such/path", io.Discard); err == nil {
		t.Error("CopyOut of a missing path succeeded")
	}
}

func TestExitNotHeldByDaemon(t *testing.T) {
	c := connect(t)
	start := time.Now()
	// The background sleep keeps stdout open; the exit must still come
	// (after the server's short ExitGrace), not when sleep ends.
	out, _, code := run(t, c, client.ExecRequest{Argv: []string{"sh", "-c", "sleep 3 & echo started"}})
	if out != "started\n" || code != 0 {
		t.Fatalf("out %q code %d", out, code)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("exit took %s: held by the daemon's pipe", d)
	}
}

func TestBackgroundOutlivesSession(t *testing.T) {
	first := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := first.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.1; done"}, Background: true})
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	// A new session (e.g. after a snapshot restore) sees the app's output.
	second := connect(t)
	for {
		select {
		case r := <-second.Logs():
			if r.ExecID == p.ID() && r.ExitCode != nil {
				if *r.ExitCode != 0 {
					t.Fatalf("exit %d", *r.ExitCode)
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("no exit record from the background workload in the second session")
		}
	}
}

// TestAdopt: a workload outlives its host session; the next session
// adopts it and gets what it printed, and its exit, while no host was
// connected. An exec id the guest does not have ends with ErrLost.
func TestAdopt(t *testing.T) {
	c1 := connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := c1.Exec(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", "sleep 0.5; echo late; exit 5"}})
	if err != nil {
		t.Fatal(err)
	}
	c1.Close()
	if _, err := p.Wait(ctx); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Wait after the session closed: %v, want ErrClosed", err)
	}
	time.Sleep(time.Second) // it prints and exits with no session
	c2 := connect(t)
	a, err := c2.Adopt(ctx, p.ID(), p.Pid())
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	var out strings.Builder
	for chunk := range a.Output() {
		out.Write(chunk.Data)
	}
	if code, err := a.Wait(ctx); err != nil || code != 5 || out.String() != "late\n" {
		t.Fatalf("adopted workload: code %d, err %v, output %q; want 5, nil, \"late\\n\"", code, err, out.String())
	}
	// Its exit was handed over: adopting it again finds it gone.
	again, err := c2.Adopt(ctx, p.ID(), p.Pid())
	if err != nil {
		t.Fatalf("Adopt again: %v", err)
	}
	if _, err := again.Wait(ctx); !errors.Is(err, client.ErrLost) {
		t.Fatalf("adopting an ended workload again: %v, want ErrLost", err)
	}
	l, err := c2.Adopt(ctx, 1<<40, 4242)
	if err != nil {
		t.Fatalf("Adopt of an unknown exec: %v", err)
	}
	if _, err := l.Wait(ctx); !errors.Is(err, client.ErrLost) {
		t.Fatalf("unknown exec: %v, want ErrLost", err)
	}
}
