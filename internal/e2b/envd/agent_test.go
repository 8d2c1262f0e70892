//go:build linux

package envd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/guest"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// hostSystem stands in for the guest's privileged calls, which envd never
// makes.
type hostSystem struct{}

func (hostSystem) Freeze(context.Context) error { return nil }
func (hostSystem) Thaw(context.Context) error   { return nil }
func (hostSystem) Reseed([]byte) error          { return nil }
func (hostSystem) SetClock(time.Time) error     { return nil }
func (hostSystem) SetHostname(string) error     { return nil }
func (hostSystem) KillAll(int) error            { return nil }
func (hostSystem) PowerOff() error              { return nil }
func (hostSystem) Running() int                 { return 0 }

// oneAgent is the real guest agent, run in this process over a socket
// pair: envd's translation is tested against the agent's real protocol
// and file handling (on a temporary directory of this host).
type oneAgent struct{ c *client.Client }

func (a oneAgent) Agent(context.Context, string) (*client.Client, error) { return a.c, nil }

func newAgent(t *testing.T) *client.Client {
	t.Helper()
	return newAgentWith(t, guest.Config{})
}

// newAgentWith is newAgent with cfg (its System and ExitGrace are set).
func newAgentWith(t *testing.T, cfg guest.Config) *client.Client {
	t.Helper()
	testenv.NeedRoot(t, "the guest agent runs workloads as root")
	cfg.System, cfg.ExitGrace = hostSystem{}, 200*time.Millisecond
	srv := guest.NewServer(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	go srv.Reap(ctx)
	t.Cleanup(cancel)
	return serveSession(t, srv, filepath.Join(t.TempDir(), "s"))
}

// serveSession begins a host session with srv over a unix socket at sock.
func serveSession(t *testing.T, srv *guest.Server, sock string) *client.Client {
	t.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := l.Accept(); ch <- c }()
	hostSide, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	guestSide := <-ch
	ctx, cancel := context.WithCancel(context.Background())
	go srv.Serve(ctx, guestSide, guestSide)
	t.Cleanup(func() { cancel(); guestSide.Close() })
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer ccancel()
	c, err := client.New(cctx, hostSide, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sandboxStore is a store holding sandbox mvm-1 of account acct with env.
func sandboxStore(t *testing.T, env map[string]string) store.E2BStore {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.PutE2BSandbox(ctx, store.E2BSandbox{ID: "mvm-1", Account: "acct", TemplateID: "t",
		EnvVars: env, CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestEnvdOverAgent: commands stream output and exit codes with the
// sandbox's env vars; uploads (multipart with full paths, and raw),
// downloads, listings and stats go through the agent's copy and list_dir.
func TestEnvdOverAgent(t *testing.T) {
	st := sandboxStore(t, map[string]string{"GREETING": "hello from the sandbox"})
	h := New(Config{Agents: oneAgent{newAgent(t)}, Sandboxes: st,
		Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	defer stopServer(hs)
	dir := t.TempDir()

	// A command: start, stdout, stderr, end with its exit code.
	req, _ := json.Marshal(map[string]any{"process": map[string]any{"cmd": "/bin/sh",
		"args": []string{"-c", "echo $GREETING $EXTRA; echo oops >&2; exit 3"}, "envs": map[string]string{"EXTRA": "+1"}}})
	resp, err := http.Post(hs.URL+"/process.Process/Start", contentStream, bytes.NewReader(envelope(0, string(req))))
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr strings.Builder
	var started, ended bool
	exit := -1
	for {
		flags, msg, err := readEnvelope(resp.Body, 1<<20)
		if err != nil {
			t.Fatalf("stream ended without its end message: %v", err)
		}
		if flags&flagEndStream != 0 {
			if string(msg) != "{}" {
				t.Fatalf("end of stream: %s", msg)
			}
			break
		}
		var ev struct {
			Event struct {
				Start *struct{ Pid uint32 }
				Data  *struct{ Stdout, Stderr []byte }
				End   *struct {
					ExitCode int
					Exited   bool
				}
			}
		}
		if err := json.Unmarshal(msg, &ev); err != nil {
			t.Fatal(err)
		}
		switch e := ev.Event; {
		case e.Start != nil:
			started = e.Start.Pid > 0
		case e.Data != nil:
			stdout.Write(e.Data.Stdout)
			stderr.Write(e.Data.Stderr)
		case e.End != nil:
			ended, exit = e.End.Exited, e.End.ExitCode
		}
	}
	resp.Body.Close()
	if !started || !ended || exit != 3 || stdout.String() != "hello from the sandbox +1\n" || stderr.String() != "oops\n" {
		t.Fatalf("started %v ended %v exit %d stdout %q stderr %q", started, ended, exit, stdout.String(), stderr.String())
	}

	// Multipart without ?path=: each file goes to its own full path.
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	for name, data := range map[string]string{dir + "/a/x.txt": "first", dir + "/b/c/y.txt": "second"} {
		w, _ := mw.CreateFormFile("file", name)
		io.WriteString(w, data)
	}
	mw.Close()
	resp, err = http.Post(hs.URL+"/files", mw.FormDataContentType(), &body)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("upload: %d %s", resp.StatusCode, b)
	}
	for p, want := range map[string]string{dir + "/a/x.txt": "first", dir + "/b/c/y.txt": "second"} {
		if got, err := os.ReadFile(p); err != nil || string(got) != want {
			t.Fatalf("%s holds %q (%v), want %q", p, got, err, want)
		}
	}
	// Raw body to ?path=.
	resp, err = http.Post(hs.URL+"/files?path="+dir+"/raw.bin", "application/octet-stream", strings.NewReader("raw bytes"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got, _ := os.ReadFile(dir + "/raw.bin"); resp.StatusCode != 200 || string(got) != "raw bytes" {
		t.Fatalf("raw upload: %d, file %q", resp.StatusCode, got)
	}

	// Downloads: the file; a directory is 400, a missing file 404.
	for p, want := range map[string]any{dir + "/a/x.txt": "first", dir + "/a": 400, dir + "/nope": 404} {
		resp, err := http.Get(hs.URL + "/files?path=" + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch want := want.(type) {
		case string:
			if resp.StatusCode != 200 || string(b) != want || resp.Header.Get("Content-Length") != fmt.Sprint(len(want)) {
				t.Fatalf("download %s: %d %q", p, resp.StatusCode, b)
			}
		case int:
			if resp.StatusCode != want {
				t.Fatalf("download %s: %d %s, want %d", p, resp.StatusCode, b, want)
			}
		}
	}

	// ListDir to depth 2, and Stat.
	unary := func(method string, in any, out any) int {
		b, _ := json.Marshal(in)
		resp, err := http.Post(hs.URL+"/filesystem.Filesystem/"+method, contentUnary, bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		json.NewDecoder(resp.Body).Decode(out)
		return resp.StatusCode
	}
	var list struct{ Entries []entryInfo }
	if code := unary("ListDir", map[string]any{"path": dir, "depth": 2}, &list); code != 200 {
		t.Fatalf("ListDir: %d", code)
	}
	var got []string
	for _, e := range list.Entries {
		got = append(got, strings.TrimPrefix(e.Path, dir)+" "+e.Type)
	}
	sort.Strings(got)
	want := []string{"/a FILE_TYPE_DIRECTORY", "/a/x.txt FILE_TYPE_FILE", "/b FILE_TYPE_DIRECTORY", "/b/c FILE_TYPE_DIRECTORY", "/raw.bin FILE_TYPE_FILE"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("ListDir depth 2: %v, want %v", got, want)
	}
	var stat struct{ Entry entryInfo }
	if code := unary("Stat", map[string]any{"path": dir + "/raw.bin"}, &stat); code != 200 || stat.Entry.Size != "9" || stat.Entry.Name != "raw.bin" {
		t.Fatalf("Stat: %d %+v", code, stat.Entry)
	}
	var e rpcError
	if code := unary("Stat", map[string]any{"path": dir + "/nope"}, &e); code != 404 || e.Code != codeNotFound {
		t.Fatalf("Stat of a missing path: %d %+v", code, e)
	}
}
