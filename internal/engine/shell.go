//go:build linux

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// ShellResize is the one control message of the shell WebSocket (a text
// frame); binary frames carry the terminal's bytes both ways.
type ShellResize struct {
	Cols uint16 `json:"cols"`
	Rows uint16 `json:"rows"`
}

// shellMaxMessage bounds one frame from the client.
const shellMaxMessage = 1 << 20

// ShellHandler serves SHELL_INGRESS for the endpoint proxy (proxy.Config.
// ShellHandler): after the proxy has checked the shell token and woken the
// VM, the WebSocket is bridged to a login shell on a PTY in the guest,
// started through kiln-agent. Binary frames are terminal bytes; a text
// frame {"cols":N,"rows":N} resizes; the socket closes with the shell's
// exit status as reason ("exit 0"). ?cols=&rows= set the first size.
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
		err = e.bridgeShell(r.Context(), c, id, size(r, "cols", 80), size(r, "rows", 24))
		if err != nil {
			e.log.Info("shell ended", "microvm", id, "err", err)
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

func (e *Engine) bridgeShell(ctx context.Context, c *websocket.Conn, id string, cols, rows uint16) error {
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	a, err := e.cfg.Driver.Agent(actx, id)
	if err != nil {
		cancel()
		return err
	}
	p, err := a.Exec(actx, client.ExecRequest{
		Argv: []string{"/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"},
		Env:  []string{"TERM=xterm-256color", "HOME=/root", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Cwd:  "/", Stdin: true, TTY: true, Cols: cols, Rows: rows,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("starting the shell: %w", err)
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
			if typ == websocket.MessageText {
				var rs ShellResize
				if json.Unmarshal(b, &rs) == nil && rs.Cols > 0 && rs.Rows > 0 {
					p.Resize(wctx, rs.Cols, rs.Rows)
				}
			} else if err := p.Write(wctx, b); err != nil {
				cancel()
				return
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
				return c.Close(websocket.StatusNormalClosure, fmt.Sprintf("exit %d", code))
			}
			if err := c.Write(ctx, websocket.MessageBinary, o.Data); err != nil {
				return nil // the client went away; the shell gets SIGHUP
			}
		case <-ctx.Done():
			return nil
		}
	}
}
