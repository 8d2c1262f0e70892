//go:build linux

package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/remote"
)

// shellMaxMessage bounds one frame from the client.
const shellMaxMessage = remote.MaxMessage

// guestPath is the PATH of the shell and of kiln exec.
const guestPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ShellHandler serves SHELL_INGRESS for the endpoint proxy (proxy.Config.
// ShellHandler): after the proxy has checked the shell token and woken the
// VM, the WebSocket is bridged to a login shell on a PTY in the guest,
// started through kiln-agent. Binary frames are terminal bytes; a text
// frame {"cols":N,"rows":N} resizes; the socket closes with the shell's
// exit status as reason ("exit 0"). ?cols=&rows= set the first size.
// The paths /exec, /copy-out and /copy-in serve kiln exec and kiln cp on
// the same socket and token (internal/remote describes their frames).
func (e *Engine) ShellHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := proxy.MicrovmID(r.Context())
		// Echo the client's marker (AWS's browser list starts with the bare
		// "lambda-microvms"), else its port or auth subprotocol: browsers
		// fail a handshake that offered protocols and got none back.
		var base, port, auth []string
		for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
			for _, p := range strings.Split(v, ",") {
				switch p = strings.TrimSpace(p); {
				case p == proxy.SubprotoBase:
					base = append(base, p)
				case strings.HasPrefix(p, proxy.SubprotoPort):
					port = append(port, p)
				case strings.HasPrefix(p, proxy.SubprotoAuth):
					auth = append(auth, p)
				}
			}
		}
		offered := append(append(base, port...), auth...)
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: offered, InsecureSkipVerify: true})
		if err != nil {
			return
		}
		c.SetReadLimit(shellMaxMessage)
		switch r.URL.Path {
		case remote.PathExec:
			err = e.serveExec(r.Context(), c, id)
		case remote.PathCopyOut:
			err = e.serveCopyOut(r.Context(), c, id)
		case remote.PathCopyIn:
			err = e.serveCopyIn(r.Context(), c, id)
		default:
			err = e.bridge(r.Context(), c, id, client.ExecRequest{
				Argv: []string{"/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"},
				Env:  []string{"TERM=xterm-256color", "HOME=/root", "PATH=" + guestPath},
				Cwd:  "/", Stdin: true, TTY: true, Cols: size(r, "cols", 80), Rows: size(r, "rows", 24),
			}, false)
		}
		if err != nil {
			e.log.Info("shell socket ended", "microvm", id, "path", r.URL.Path, "err", err)
			c.Close(websocket.StatusInternalError, trimReason(err.Error()))
		}
	})
}

func size(r *http.Request, name string, def uint16) uint16 {
	n, err := strconv.ParseUint(r.URL.Query().Get(name), 10, 16)
	if err != nil || n == 0 {
		return def
	}
	return uint16(n)
}

// trimReason fits a close reason into a control frame (123 bytes).
func trimReason(s string) string {
	if len(s) > 120 {
		s = s[:120]
	}
	return s
}

// firstMessage reads the client's request frame of an exec or copy socket.
func firstMessage(ctx context.Context, c *websocket.Conn) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	typ, b, err := c.Read(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the request: %w", err)
	}
	if typ != websocket.MessageText {
		return nil, errors.New("the first frame must be the JSON request (a text frame)")
	}
	return b, nil
}

func (e *Engine) agentOf(ctx context.Context, id string) (*client.Client, error) {
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return e.cfg.Driver.Agent(actx, id)
}

// serveExec runs one command for kiln exec, its output framed by stream.
func (e *Engine) serveExec(ctx context.Context, c *websocket.Conn, id string) error {
	b, err := firstMessage(ctx, c)
	if err != nil {
		return err
	}
	req, err := remote.ParseExecRequest(b)
	if err != nil {
		return err
	}
	env := []string{"HOME=/root", "PATH=" + guestPath}
	if req.TTY {
		env = append(env, "TERM=xterm-256color")
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = "/"
	}
	return e.bridge(ctx, c, id, client.ExecRequest{Argv: req.Argv, Env: append(env, req.Env...), Cwd: cwd,
		Stdin: req.Stdin, TTY: req.TTY, Cols: req.Cols, Rows: req.Rows}, true)
}

// bridge runs a workload and joins it to the socket: binary frames in are
// its stdin, text frames are remote.Control (size, end of stdin); its
// output goes out raw (the shell) or framed by stream (exec). The socket
// closes with its exit status.
func (e *Engine) bridge(ctx context.Context, c *websocket.Conn, id string, req client.ExecRequest, framed bool) error {
	a, err := e.agentOf(ctx, id)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	p, err := a.Exec(sctx, req)
	cancel()
	if err != nil {
		return fmt.Errorf("starting %s: %w", req.Argv[0], err)
	}
	// The shell is a connection through the proxy, so the proxy's
	// ConnOpened/ConnClosed already keep the VM from idling under it.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	defer func() {
		select {
		case <-p.Exited():
		default:
			// The client went away: SIGHUP, as for a closed terminal.
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			p.Signal(sctx, 1)
			cancel()
		}
	}()
	go func() {
		defer stop()
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				return
			}
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			switch {
			case typ == websocket.MessageText:
				ctl, err := remote.ParseControl(b)
				switch {
				case err != nil: // a stray frame does not end a session
				case ctl.EOF && req.Stdin:
					p.CloseStdin(wctx)
				case ctl.Cols > 0 && req.TTY:
					p.Resize(wctx, ctl.Cols, ctl.Rows)
				}
			case req.Stdin:
				if err := p.Write(wctx, b); err != nil {
					cancel()
					return
				}
			}
			cancel()
		}
	}()
	for {
		select {
		case o, ok := <-p.Output():
			if !ok {
				code, err := p.Wait(context.WithoutCancel(ctx))
				if err != nil {
					return err
				}
				return c.Close(websocket.StatusNormalClosure, remote.ExitReason(code))
			}
			data := o.Data
			if framed {
				stream := remote.Stdout
				if o.Stream == proto.Stderr {
					stream = remote.Stderr
				}
				data = remote.EncodeOutput(stream, data)
			}
			if err := c.Write(ctx, websocket.MessageBinary, data); err != nil {
				return nil // the client went away; the shell gets SIGHUP
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// binaryWriter sends each write as one binary frame (the agent's copy
// chunks, at most proto.MaxCopyChunk).
type binaryWriter struct {
	ctx context.Context
	c   *websocket.Conn
}

func (w binaryWriter) Write(p []byte) (int, error) {
	ctx, cancel := context.WithTimeout(w.ctx, time.Minute)
	defer cancel()
	if err := w.c.Write(ctx, websocket.MessageBinary, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// copyRequest reads a copy socket's request and finds the agent.
func (e *Engine) copyRequest(ctx context.Context, c *websocket.Conn, id string) (remote.CopyRequest, *client.Client, error) {
	b, err := firstMessage(ctx, c)
	if err != nil {
		return remote.CopyRequest{}, nil, err
	}
	req, err := remote.ParseCopyRequest(b)
	if err != nil {
		return req, nil, err
	}
	a, err := e.agentOf(ctx, id)
	return req, a, err
}

// serveCopyOut sends the tar stream of a guest path for kiln cp.
func (e *Engine) serveCopyOut(ctx context.Context, c *websocket.Conn, id string) error {
	req, a, err := e.copyRequest(ctx, c, id)
	if err != nil {
		return err
	}
	if err := a.CopyOut(ctx, req.Path, binaryWriter{ctx, c}); err != nil {
		return err
	}
	return c.Close(websocket.StatusNormalClosure, remote.ExitReason(0))
}

// serveCopyIn extracts a tar stream from kiln cp at a guest path: it
// first says whether the path is an existing directory (remote.CopyInfo).
func (e *Engine) serveCopyIn(ctx context.Context, c *websocket.Conn, id string) error {
	req, a, err := e.copyRequest(ctx, c, id)
	if err != nil {
		return err
	}
	var info remote.CopyInfo
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	l, err := a.ListDir(lctx, req.Path, 0)
	cancel()
	switch {
	case err == nil && len(l.Entries) == 1:
		info = remote.CopyInfo{Exists: true, Dir: l.Entries[0].Type == proto.FileDir}
	case err != nil && !strings.Contains(err.Error(), "no such file or directory"):
		return err
	}
	ib, _ := json.Marshal(info)
	if err := c.Write(ctx, websocket.MessageText, ib); err != nil {
		return err
	}
	pr, pw := io.Pipe()
	go func() {
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				pw.CloseWithError(fmt.Errorf("the client went away: %w", err))
				return
			}
			if typ == websocket.MessageBinary {
				if _, err := pw.Write(b); err != nil {
					return
				}
				continue
			}
			if ctl, err := remote.ParseControl(b); err == nil && ctl.EOF {
				pw.Close()
				return
			}
		}
	}()
	err = a.CopyIn(ctx, info.ExtractDir(req.Path), pr)
	pr.CloseWithError(errors.New("copy ended"))
	if err != nil {
		return err
	}
	return c.Close(websocket.StatusNormalClosure, remote.ExitReason(0))
}
