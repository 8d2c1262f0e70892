//go:build linux

package engine_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/remote"
	"github.com/kiln-sandbox/kiln/internal/tartree"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// TestExecAndCopy drives kiln exec and kiln cp's socket (the shell's, on
// port 8022 with a shell token) against a real microVM through the
// endpoint proxy: output split by stream and the exit status, stdin, a
// terminal's size, a directory copied in and back out with its bytes
// unchanged, and clear errors for a missing path or command and a token
// of another microVM. Before this, the shell socket knew no exec or copy.
func TestExecAndCopy(t *testing.T) {
	h := newHarness(t)
	m := h.run([]string{shellIngress}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dialAs := func(id, path string) (*websocket.Conn, error) {
		tok, _, err := h.signer.Mint(testAccount, id, token.KindShell, []token.PortRange{token.Port(proxy.ShellPort)}, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		c, _, err := websocket.Dial(ctx, "wss://"+m.ID+"."+testDomain+path, &websocket.DialOptions{
			HTTPClient:   h.client,
			Subprotocols: []string{proxy.SubprotoAuth + tok, proxy.SubprotoPort + "8022"},
		})
		return c, err
	}
	dial := func(path string) *websocket.Conn {
		c, err := dialAs(m.ID, path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	run := func(req remote.ExecRequest, stdin io.Reader) (string, string, int, error) {
		var out, errb bytes.Buffer
		code, err := remote.Exec(ctx, dial(remote.PathExec), req, stdin, &out, &errb, nil)
		return out.String(), errb.String(), code, err
	}

	t.Run("output, stderr and exit status", func(t *testing.T) {
		out, errs, code, err := run(remote.ExecRequest{Argv: []string{"/bin/sh", "-c", "echo out; echo err >&2; echo $GREETING; pwd; exit 7"},
			Env: []string{"GREETING=hi"}, Cwd: "/tmp"}, nil)
		if err != nil || code != 7 || out != "out\nhi\n/tmp\n" || errs != "err\n" {
			t.Fatalf("exit %d %v, stdout %q, stderr %q", code, err, out, errs)
		}
	})
	t.Run("stdin", func(t *testing.T) {
		out, _, code, err := run(remote.ExecRequest{Argv: []string{"/bin/sh", "-c", "while read l; do echo \"<$l>\"; done; echo done"}, Stdin: true},
			strings.NewReader("a\nb\n"))
		if err != nil || code != 0 || out != "<a>\n<b>\ndone\n" {
			t.Fatalf("exit %d %v, stdout %q", code, err, out)
		}
	})
	t.Run("tty", func(t *testing.T) {
		out, _, code, err := run(remote.ExecRequest{Argv: []string{"stty", "size"}, TTY: true, Cols: 100, Rows: 30}, nil)
		if err != nil || code != 0 || !strings.Contains(out, "30 100") {
			t.Fatalf("exit %d %v, output %q", code, err, out)
		}
	})
	t.Run("missing command", func(t *testing.T) {
		_, _, _, err := run(remote.ExecRequest{Argv: []string{"no-such-command"}}, nil)
		if err == nil || !strings.Contains(err.Error(), "not found") {
			t.Fatalf("err %v, want one saying the command was not found", err)
		}
	})

	t.Run("copy a directory in and back out", func(t *testing.T) {
		src := filepath.Join(t.TempDir(), "tree")
		big := make([]byte, 1<<20+123) // several copy chunks
		rand.Read(big)
		os.MkdirAll(filepath.Join(src, "sub"), 0o755)
		os.WriteFile(filepath.Join(src, "a.txt"), []byte("alpha\n"), 0o644)
		os.WriteFile(filepath.Join(src, "sub", "big.bin"), big, 0o600)
		os.Symlink("a.txt", filepath.Join(src, "link"))
		err := remote.CopyIn(ctx, dial(remote.PathCopyIn), "/tmp/copied", func(info remote.CopyInfo, w io.Writer) error {
			if info.Exists {
				t.Errorf("/tmp/copied exists already: %+v", info)
			}
			return tartree.WriteTar(w, src, info.TopName("/tmp/copied", "tree"))
		})
		if err != nil {
			t.Fatalf("copy in: %v", err)
		}
		out, _, code, err := run(remote.ExecRequest{Argv: []string{"/bin/sh", "-c", "cat /tmp/copied/a.txt; readlink /tmp/copied/link; wc -c < /tmp/copied/sub/big.bin"}}, nil)
		if err != nil || code != 0 || strings.Join(strings.Fields(out), " ") != "alpha a.txt 1048699" {
			t.Fatalf("in the guest: exit %d %v, %q", code, err, out)
		}

		dst := t.TempDir()
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(remote.CopyOut(ctx, dial(remote.PathCopyOut), "/tmp/copied", pw)) }()
		if err := remote.ReceiveTree(ctx, pr, dst, nil); err != nil {
			t.Fatalf("copy out: %v", err)
		}
		if b, _ := os.ReadFile(filepath.Join(dst, "copied", "a.txt")); string(b) != "alpha\n" {
			t.Fatalf("a.txt came back as %q", b)
		}
		if b, _ := os.ReadFile(filepath.Join(dst, "copied", "sub", "big.bin")); !bytes.Equal(b, big) {
			t.Fatalf("big.bin came back with %d bytes, not the %d sent", len(b), len(big))
		}
		if l, _ := os.Readlink(filepath.Join(dst, "copied", "link")); l != "a.txt" {
			t.Fatalf("link came back pointing to %q", l)
		}
	})

	t.Run("copy of a missing path", func(t *testing.T) {
		err := remote.CopyOut(ctx, dial(remote.PathCopyOut), "/no/such/file", io.Discard)
		if err == nil || !strings.Contains(err.Error(), "no such file or directory") {
			t.Fatalf("err %v, want no such file or directory", err)
		}
	})
	t.Run("token of another microvm", func(t *testing.T) {
		if _, err := dialAs("mvm-someone-else", remote.PathExec); err == nil || !strings.Contains(err.Error(), "403") {
			t.Fatalf("dial: %v, want 403", err)
		}
	})
}
