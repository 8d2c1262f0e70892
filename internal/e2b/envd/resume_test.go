//go:build linux

package envd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
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

	mu      sync.Mutex
	c       *client.Client
	n       int
	changed chan struct{} // closed and made anew as a session ends or begins
}

// Changed is the engine's notice of a state change (ChangeNotifier).
func (s *sessions) Changed(string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// notify wakes Changed's waiters; s.mu is held.
func (s *sessions) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
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
	s.notify()
	s.mu.Unlock()
}

// disconnect ends the current session (the VM paused).
func (s *sessions) disconnect() {
	s.mu.Lock()
	c := s.c
	s.c = nil
	s.notify()
	s.mu.Unlock()
	c.Close()
}

// resumeEnv is envd on one real guest agent whose sessions the test ends
// and begins (sessions), as a pause and resume do.
func resumeEnv(t *testing.T) (*sessions, *httptest.Server) {
	testenv.NeedRoot(t, "the guest agent runs workloads as root")
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	srv := guest.NewServer(guest.Config{System: hostSystem{}, ExitGrace: 200 * time.Millisecond})
	rctx, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	go srv.Reap(rctx)
	ss := &sessions{t: t, srv: srv, dir: t.TempDir(), changed: make(chan struct{})}
	ss.connect()
	h := New(Config{Agents: ss, Sandboxes: st, Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	t.Cleanup(func() { stopServer(hs) })
	return ss, hs
}

// TestEnvdProcessAcrossSessions: a background command started before the
// agent session ended (a pause) is still listed after a new session
// begins (the resume), takes input, streams its later output to a new
// Connect, and is killed with its signal reported. Before, the host ended
// every envd process with its session ("lost the sandbox") although the
// guest kept it running.
func TestEnvdProcessAcrossSessions(t *testing.T) {
	ss, hs := resumeEnv(t)
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

// TestEnvdAdoptedOnResume: a process of a paused sandbox is adopted into
// the new agent session when the engine says the sandbox changed state,
// with no request for it and no poll (the polls here are an hour apart),
// so what it wrote while paused reaches the stream attached before. The
// agent keeps only 256 KiB of a process's output until it is adopted;
// envd used to find out by polling, backing off to a second.
func TestEnvdAdoptedOnResume(t *testing.T) {
	old := reattachPoll
	reattachPoll = [2]time.Duration{time.Hour, time.Hour}
	t.Cleanup(func() { reattachPoll = old })
	ss, hs := resumeEnv(t)
	started := openStream(t, hs.URL, "Start", map[string]any{
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo before; sleep 1; echo while-paused; exec sleep 1000"}}})
	first := <-started
	if first.Start == nil {
		t.Fatalf("first event %+v, want start", first)
	}
	sel := map[string]any{"pid": first.Start.Pid}
	defer processCall(t, hs, "SendSignal", map[string]any{"process": sel, "signal": "SIGNAL_SIGKILL"})
	until(t, started, "before")
	ss.disconnect()
	time.Sleep(1500 * time.Millisecond)
	ss.connect()
	until(t, started, "while-paused")
}

// TestEnvdAdoptBehindBlockedStdin: a process with input it never reads
// (the guest's write to its stdin blocked before the pause) is adopted
// after the resume and can be killed. The guest answered the adoption's
// probe only after that write, the probe timed out after 30 s, and envd
// dropped a process that still ran.
func TestEnvdAdoptBehindBlockedStdin(t *testing.T) {
	ss, hs := resumeEnv(t)
	call := func(method string, in any) (int, string) { return processCall(t, hs, method, in) }
	started := openStream(t, hs.URL, "Start", map[string]any{"stdin": true,
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo up; exec sleep 1000"}}})
	first := <-started
	if first.Start == nil {
		t.Fatalf("first event %+v, want start", first)
	}
	sel := map[string]any{"pid": first.Start.Pid}
	until(t, started, "up")
	// More than a pipe holds: the guest's write blocks on the full pipe.
	in, _ := json.Marshal(map[string]any{"process": sel, "input": map[string]any{"stdin": bytes.Repeat([]byte("x"), 300<<10)}})
	go func() {
		if resp, err := http.Post(hs.URL+"/process.Process/SendInput", contentUnary, bytes.NewReader(in)); err == nil {
			resp.Body.Close()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	ss.disconnect()
	ss.connect()
	begin := time.Now()
	if code, b := call("SendSignal", map[string]any{"process": sel, "signal": "SIGNAL_SIGKILL"}); code != 200 {
		t.Fatalf("SendSignal after resume: %d %s (after %v)", code, b, time.Since(begin))
	}
	if code := endOf(t, started); code != 137 {
		t.Fatalf("exit code %d after SIGKILL, want 137", code)
	}
	if d := time.Since(begin); d > 10*time.Second {
		t.Errorf("the kill took %v after the resume", d)
	}
}

// TestEnvdStalledStreamsEnd: a client that keeps its Connect stream open
// but stops reading is cut off once a write has waited streamWriteTimeout,
// freeing its slot: before, maxSubscribers such clients held a process's
// slots (and their handlers) for as long as they kept the connection.
func TestEnvdStalledStreamsEnd(t *testing.T) {
	old := streamWriteTimeout
	streamWriteTimeout = 500 * time.Millisecond
	t.Cleanup(func() { streamWriteTimeout = old })
	_, hs := resumeEnv(t)
	started := openStream(t, hs.URL, "Start", map[string]any{
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "echo up; exec yes flood"}}})
	first := <-started
	if first.Start == nil {
		t.Fatalf("first event %+v, want start", first)
	}
	sel := map[string]any{"pid": first.Start.Pid}
	defer processCall(t, hs, "SendSignal", map[string]any{"process": sel, "signal": "SIGNAL_SIGKILL"})
	body, _ := json.Marshal(map[string]any{"process": sel})
	msg := envelope(0, string(body))
	// The Start stream is one subscriber; 7 stalled ones fill the rest.
	for range maxSubscribers - 1 {
		c, err := net.Dial("tcp", hs.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.(*net.TCPConn).SetReadBuffer(4096)
		fmt.Fprintf(c, "POST /process.Process/Connect HTTP/1.1\r\nHost: envd\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s", contentStream, len(msg), msg)
	}
	// The started stream reads on (openStream drains it), so the process
	// keeps writing and the stalled streams' writes block.
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn := openStream(t, hs.URL, "Connect", map[string]any{"process": sel})
		ev := <-conn
		if ev.Start != nil {
			return // a slot was freed
		}
		if ev.Error == nil || ev.Error.Code != codeResourceExhaust || time.Now().After(deadline) {
			t.Fatalf("Connect with stalled streams attached: %+v, want a start once they are cut off", ev)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
