//go:build linux

package envd

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// streamEvent is one message of a process stream as the SDK reads it.
type streamEvent struct {
	Start *struct{ Pid uint32 }
	Data  *struct{ Stdout, Stderr, Pty []byte }
	End   *struct {
		ExitCode int
		Exited   bool
	}
	Error *rpcError // set on the end-of-stream message of a failed stream
}

// openStream posts a server-stream request and returns its events (the
// end-of-stream message's error, if any, as the last one).
func openStream(t *testing.T, url, method string, req any) <-chan streamEvent {
	t.Helper()
	b, _ := json.Marshal(req)
	resp, err := http.Post(url+"/process.Process/"+method, contentStream, bytes.NewReader(envelope(0, string(b))))
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan streamEvent, 1024)
	go func() {
		defer close(ch)
		defer resp.Body.Close()
		for {
			flags, msg, err := readEnvelope(resp.Body, 1<<20)
			if err != nil {
				return
			}
			if flags&flagEndStream != 0 {
				var end struct{ Error *rpcError }
				json.Unmarshal(msg, &end)
				if end.Error != nil {
					ch <- streamEvent{Error: end.Error}
				}
				return
			}
			var ev struct{ Event streamEvent }
			json.Unmarshal(msg, &ev)
			ch <- ev.Event
		}
	}()
	return ch
}

// processCall makes a unary process.Process call and returns the status
// and the answer's text.
func processCall(t *testing.T, hs *httptest.Server, method string, in any) (int, string) {
	t.Helper()
	b, _ := json.Marshal(in)
	resp, err := http.Post(hs.URL+"/process.Process/"+method, contentUnary, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

// until reads events until one's output contains want; it fails on the
// stream's end or after a timeout.
func until(t *testing.T, ch <-chan streamEvent, want string) {
	t.Helper()
	var seen []byte
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev, ok := <-ch:
			if !ok || ev.End != nil || ev.Error != nil {
				t.Fatalf("stream ended (%+v) before %q; saw %q", ev, want, seen)
			}
			if ev.Data != nil {
				seen = append(append(append(seen, ev.Data.Pty...), ev.Data.Stdout...), ev.Data.Stderr...)
				if bytes.Contains(seen, []byte(want)) {
					return
				}
			}
		case <-timeout:
			t.Fatalf("no %q within 20 s; saw %q", want, seen)
		}
	}
}

// endOf reads until the stream's End event and returns its exit code.
func endOf(t *testing.T, ch <-chan streamEvent) int {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev, ok := <-ch:
			if !ok || ev.Error != nil {
				t.Fatalf("stream ended without an End event: %+v", ev.Error)
			}
			if ev.End != nil {
				return ev.End.ExitCode
			}
		case <-timeout:
			t.Fatal("no End event within 20 s")
		}
	}
}

// TestEnvdPTYAndConnect drives processes through envd over the real agent
// as the SDK does: a PTY gets input, is resized and reattached (Connect),
// takes input through StreamInput and exits with its status on every
// attached stream; a background command whose starting stream went away
// is found by tag and streams its later output. Before PTY support every
// Start with a pty was refused.
func TestEnvdPTYAndConnect(t *testing.T) {
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h := New(Config{Agents: oneAgent{newAgent(t)}, Sandboxes: st,
		Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	defer stopServer(hs)
	unary := func(method string, in any) (int, string) { return processCall(t, hs, method, in) }

	pty := openStream(t, hs.URL, "Start", map[string]any{
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-i"}, "envs": map[string]string{"PS1": "$ "}},
		"pty":     map[string]any{"size": map[string]any{"cols": 80, "rows": 24}}})
	first := <-pty
	if first.Start == nil || first.Start.Pid == 0 {
		t.Fatalf("first event %+v, want start with a pid", first)
	}
	pid := first.Start.Pid
	sel := map[string]any{"pid": pid}
	if code, b := unary("SendInput", map[string]any{"process": sel, "input": map[string]any{"pty": []byte("echo hi-$((40+2))\n")}}); code != 200 {
		t.Fatalf("SendInput pty: %d %s", code, b)
	}
	until(t, pty, "hi-42")
	if code, b := unary("Update", map[string]any{"process": sel, "pty": map[string]any{"size": map[string]any{"cols": 100, "rows": 30}}}); code != 200 {
		t.Fatalf("Update: %d %s", code, b)
	}
	unary("SendInput", map[string]any{"process": sel, "input": map[string]any{"pty": []byte("stty size\n")}})
	until(t, pty, "30 100")

	// A second stream on the same PTY sees what both see from now on.
	again := openStream(t, hs.URL, "Connect", map[string]any{"process": sel})
	if ev := <-again; ev.Start == nil || ev.Start.Pid != pid {
		t.Fatalf("Connect's first event %+v, want start with pid %d", ev, pid)
	}
	unary("SendInput", map[string]any{"process": sel, "input": map[string]any{"pty": []byte("echo again-$((1+1))\n")}})
	until(t, again, "again-2")
	until(t, pty, "again-2")

	// StreamInput: a start message, then input, answered at its end.
	var body bytes.Buffer
	var resp *http.Response
	for _, m := range []any{
		map[string]any{"start": map[string]any{"process": sel}},
		map[string]any{"keepalive": map[string]any{}},
		map[string]any{"data": map[string]any{"input": map[string]any{"pty": []byte("exit 5\n")}}},
	} {
		b, _ := json.Marshal(m)
		body.Write(envelope(0, string(b)))
	}
	resp, err = http.Post(hs.URL+"/process.Process/StreamInput", contentStream, &body)
	if err != nil {
		t.Fatal(err)
	}
	_, msg, _ := readEnvelope(resp.Body, 1<<20)
	flags, end, _ := readEnvelope(resp.Body, 1<<20)
	resp.Body.Close()
	if string(msg) != "{}" || flags != flagEndStream || string(end) != "{}" {
		t.Fatalf("StreamInput answered %s then %s", msg, end)
	}
	if code := endOf(t, pty); code != 5 {
		t.Fatalf("PTY exit %d on the starting stream, want 5", code)
	}
	if code := endOf(t, again); code != 5 {
		t.Fatalf("PTY exit %d on the connected stream, want 5", code)
	}
	if code, b := unary("SendSignal", map[string]any{"process": sel, "signal": "SIGNAL_SIGKILL"}); code != 404 {
		t.Fatalf("kill after the end: %d %s, want 404 (pty.kill then says false)", code, b)
	}

	// A background command: its starting stream goes, Connect by tag
	// finds it and streams its later output and its end.
	b, _ := json.Marshal(map[string]any{"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "sleep 1; echo later; exit 4"}}, "tag": "bg"})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", hs.URL+"/process.Process/Start", bytes.NewReader(envelope(0, string(b))))
	req.Header.Set("Content-Type", contentStream)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, msg, err := readEnvelope(resp.Body, 1<<20); err != nil || !strings.Contains(string(msg), `"start"`) {
		t.Fatalf("background start: %s %v", msg, err)
	}
	cancel()
	resp.Body.Close()
	bg := openStream(t, hs.URL, "Connect", map[string]any{"process": map[string]any{"tag": "bg"}})
	if ev := <-bg; ev.Start == nil {
		t.Fatalf("Connect by tag: %+v", ev)
	}
	until(t, bg, "later")
	if code := endOf(t, bg); code != 4 {
		t.Fatalf("background exit %d, want 4", code)
	}

	// Refusals: the bad sizes, pty input to a plain process, resize of a
	// plain process, an unknown pid.
	bad := openStream(t, hs.URL, "Start", map[string]any{"process": map[string]any{"cmd": "/bin/sh"}, "pty": map[string]any{"size": map[string]any{"cols": 0, "rows": 24}}})
	if ev := <-bad; ev.Error == nil || ev.Error.Code != codeInvalidArgument {
		t.Fatalf("pty of 0 columns: %+v", ev)
	}
	plain := openStream(t, hs.URL, "Start", map[string]any{"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "read x; echo got $x"}}, "stdin": true})
	ev := <-plain
	if ev.Start == nil {
		t.Fatalf("plain start: %+v", ev)
	}
	psel := map[string]any{"pid": ev.Start.Pid}
	if code, b := unary("SendInput", map[string]any{"process": psel, "input": map[string]any{"pty": []byte("x\n")}}); code != 400 {
		t.Fatalf("pty input to a plain process: %d %s", code, b)
	}
	if code, b := unary("Update", map[string]any{"process": psel, "pty": map[string]any{"size": map[string]any{"cols": 10, "rows": 10}}}); code != 400 {
		t.Fatalf("resize of a plain process: %d %s", code, b)
	}
	if code, b := unary("SendInput", map[string]any{"process": psel, "input": map[string]any{"stdin": []byte("yes\n")}}); code != 200 {
		t.Fatalf("stdin: %d %s", code, b)
	}
	until(t, plain, "got yes")
	if code, _ := unary("Update", map[string]any{"process": map[string]any{"pid": 999999}}); code != 404 {
		t.Fatalf("Update of an unknown pid: %d", code)
	}
	gone := openStream(t, hs.URL, "Connect", map[string]any{"process": map[string]any{"pid": 999999}})
	if ev := <-gone; ev.Error == nil || ev.Error.Code != codeNotFound {
		t.Fatalf("Connect to an unknown pid: %+v", ev)
	}
}

func FuzzNextInput(f *testing.F) {
	f.Add(envelope(0, `{"start":{"process":{"pid":1}}}`))
	f.Add(envelope(0, `{"data":{"input":{"pty":"aGkK"}}}`))
	f.Add(envelope(flagEndStream, `{}`))
	f.Add(envelope(flagCompressed, `{}`))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for range 8 {
			m, e, err := nextInput(r)
			if err != nil || e != nil {
				return
			}
			if m.Data != nil && m.Data.Input != nil && len(m.Data.Input.Stdin)+len(m.Data.Input.Pty) > maxMessage {
				t.Fatalf("input of %d bytes from a %d-byte stream", len(m.Data.Input.Stdin)+len(m.Data.Input.Pty), len(b))
			}
		}
	})
}

// TestEnvdProcessBound: a sandbox runs at most MaxProcesses processes
// through envd at once; the next Start is refused with resource_exhausted
// until one ends.
func TestEnvdProcessBound(t *testing.T) {
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h := New(Config{Agents: oneAgent{newAgent(t)}, Sandboxes: st, MaxProcesses: 2,
		Target: func(context.Context) (string, string) { return "mvm-1", "acct" }})
	hs := httptest.NewServer(h)
	defer stopServer(hs)
	start := func() streamEvent {
		return <-openStream(t, hs.URL, "Start", map[string]any{"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", "sleep 30"}}})
	}
	kill := func(pid uint32) {
		b, _ := json.Marshal(map[string]any{"process": map[string]any{"pid": pid}, "signal": "SIGNAL_SIGKILL"})
		resp, err := http.Post(hs.URL+"/process.Process/SendSignal", contentUnary, bytes.NewReader(b))
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("kill: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	first, second := start(), start()
	if first.Start == nil || second.Start == nil {
		t.Fatal("the first two starts failed")
	}
	defer kill(second.Start.Pid)
	if ev := start(); ev.Error == nil || ev.Error.Code != codeResourceExhaust {
		t.Fatalf("third start: %+v, want resource_exhausted", ev)
	}
	kill(first.Start.Pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		ev := start()
		if ev.Start != nil {
			defer kill(ev.Start.Pid)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("start after a kill: %+v", ev)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
