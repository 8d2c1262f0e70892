//go:build linux

package envd

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/guest"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// sessions is one real guest agent whose host sessions can end and begin
// again, as across a pause and resume: Agent answers ErrConflict between
// them, as the driver does for a suspended VM.
type sessions struct {
	t   *testing.T
	srv *guest.Server
	dir string

	mu sync.Mutex
	c  *client.Client
	n  int
}

func (s *sessions) Agent(context.Context, string) (*client.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return nil, errdefs.ErrConflict
	}
	return s.c, nil
}

// connect begins a new host session on the same guest.
func (s *sessions) connect() {
	t := s.t
	s.mu.Lock()
	s.n++
	sock := filepath.Join(s.dir, "s"+strings.Repeat("x", s.n))
	s.mu.Unlock()
	c := serveSession(t, s.srv, sock)
	s.mu.Lock()
	s.c = c
	s.mu.Unlock()
}

// disconnect ends the current session (the VM paused).
func (s *sessions) disconnect() {
	s.mu.Lock()
	c := s.c
	s.c = nil
	s.mu.Unlock()
	c.Close()
}

// TestEnvdProcessAcrossSessions: a background command started before the
// agent session ended (a pause) is still listed after a new session
// begins (the resume), takes input, streams its later output to a new
// Connect, and is killed with its signal reported. Before, the host ended
// every envd process with its session ("lost the sandbox") although the
// guest kept it running.
func TestEnvdProcessAcrossSessions(t *testing.T) {
	testenv.NeedRoot(t, "the guest agent runs workloads as root")
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	srv := guest.NewServer(guest.Config{System: hostSystem{}, ExitGrace: 200 * time.Millisecond})
	rctx, stop := context.WithCancel(context.Background())
	defer stop()
	go srv.Reap(rctx)
	ss := &sessions{t: t, srv: srv, dir: t.TempDir()}
	ss.connect()
	h := New(Config{Agents: ss, Sandboxes: st, Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	defer stopServer(hs)
	call := func(method string, in any) (int, string) { return processCall(t, hs, method, in) }

	started := openStream(t, hs.URL, "Start", map[string]any{"stdin": true, "tag": "bg",
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo before; while read x; do echo got-$x; done"}}})
	first := <-started
	if first.Start == nil {
		t.Fatalf("first event %+v, want start", first)
	}
	pid := first.Start.Pid
	sel := map[string]any{"pid": pid}
	until(t, started, "before")

	ss.disconnect()
	// While no session runs (paused), input cannot reach it: a clear error.
	if code, b := call("SendInput", map[string]any{"process": sel, "input": map[string]any{"stdin": []byte("x\n")}}); code == 200 || !strings.Contains(b, "paused") {
		t.Fatalf("SendInput while paused: %d %s, want an error naming the pause", code, b)
	}
	// Output of the gap waits in the guest for the next session.
	time.Sleep(300 * time.Millisecond)
	ss.connect()

	if code, b := call("List", map[string]any{}); code != 200 || !strings.Contains(b, `"tag":"bg"`) {
		t.Fatalf("List after resume: %d %s, want the process tagged bg", code, b)
	}
	conn := openStream(t, hs.URL, "Connect", map[string]any{"process": sel})
	if ev := <-conn; ev.Start == nil || ev.Start.Pid != pid {
		t.Fatalf("Connect's first event %+v, want start with pid %d", ev, pid)
	}
	if code, b := call("SendInput", map[string]any{"process": sel, "input": map[string]any{"stdin": []byte("after\n")}}); code != 200 {
		t.Fatalf("SendInput after resume: %d %s", code, b)
	}
	until(t, conn, "got-after")
	until(t, started, "got-after") // the stream of before the pause lives on
	if code, b := call("SendSignal", map[string]any{"process": sel, "signal": "SIGNAL_SIGKILL"}); code != 200 {
		t.Fatalf("SendSignal after resume: %d %s", code, b)
	}
	if code := endOf(t, conn); code != 137 {
		t.Fatalf("exit code %d after SIGKILL, want 137", code)
	}
	if _, b := call("List", map[string]any{}); strings.Contains(b, `"bg"`) {
		t.Fatalf("List after the kill still has it: %s", b)
	}
}
