package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
)

// chunk is the most one binary frame of the client carries.
const chunk = 256 << 10

// writeTimeout bounds one frame's write: a peer that stops reading fails
// the operation instead of hanging it.
const writeTimeout = 60 * time.Second

// Exec runs req on c, a socket opened at PathExec, and returns the
// command's exit status (128+signal when a signal killed it). With stdin
// set (and req.Stdin) its bytes go to the command and its end closes the
// command's stdin; sizes, when set, resizes the command's terminal.
func Exec(ctx context.Context, c *websocket.Conn, req ExecRequest, stdin io.Reader, stdout, stderr io.Writer, sizes <-chan [2]uint16) (int, error) {
	c.SetReadLimit(MaxMessage)
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	if err := writeJSON(ctx, c, req); err != nil {
		return 0, fmt.Errorf("sending the command: %w", err)
	}
	if stdin != nil && req.Stdin {
		// It may stay blocked in Read after the command ended; the
		// caller's process exits soon after.
		go func() {
			if sendAll(ctx, c, stdin) == nil {
				writeJSON(ctx, c, Control{EOF: true})
			}
		}()
	}
	if sizes != nil {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case s := <-sizes:
					writeJSON(ctx, c, Control{Cols: s[0], Rows: s[1]})
				}
			}
		}()
	}
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			return ExitStatus(err)
		}
		if typ != websocket.MessageBinary {
			continue
		}
		stream, data, err := DecodeOutput(b)
		if err != nil {
			return 0, err
		}
		w := stdout
		if stream == Stderr {
			w = stderr
		}
		if _, err := w.Write(data); err != nil {
			return 0, fmt.Errorf("writing output: %w", err)
		}
	}
}

// CopyOut writes the tar stream of the guest path src (entries under its
// base name) to w; c is a socket opened at PathCopyOut.
func CopyOut(ctx context.Context, c *websocket.Conn, src string, w io.Writer) error {
	c.SetReadLimit(MaxMessage)
	if err := writeJSON(ctx, c, CopyRequest{Path: src}); err != nil {
		return fmt.Errorf("sending the copy request: %w", err)
	}
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			_, err := ExitStatus(err)
			return err
		}
		if typ != websocket.MessageBinary {
			continue
		}
		if _, err := w.Write(b); err != nil {
			c.Close(websocket.StatusGoingAway, "local write failed")
			return err
		}
	}
}

// CopyIn sends a tar stream to the guest path dst; c is a socket opened
// at PathCopyIn. send writes the stream once the server said what dst is
// (CopyInfo.TopName names its top entry).
func CopyIn(ctx context.Context, c *websocket.Conn, dst string, send func(CopyInfo, io.Writer) error) error {
	c.SetReadLimit(MaxMessage)
	if err := writeJSON(ctx, c, CopyRequest{Path: dst}); err != nil {
		return fmt.Errorf("sending the copy request: %w", err)
	}
	var info CopyInfo
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			_, err := ExitStatus(err)
			if err == nil {
				err = errors.New("the server closed the copy before it began")
			}
			return err
		}
		if typ == websocket.MessageText {
			if err := json.Unmarshal(b, &info); err != nil {
				return fmt.Errorf("the server's copy answer: %w", err)
			}
			break
		}
	}
	// Read the server's close (an early error included) while sending.
	closed := make(chan error, 1)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for {
			if _, _, err := c.Read(rctx); err != nil {
				_, err := ExitStatus(err)
				closed <- err
				return
			}
		}
	}()
	fw := &frameWriter{ctx: ctx, c: c}
	if err := send(info, fw); err != nil {
		select {
		case serr := <-closed:
			if serr != nil {
				return serr // the server's reason is the better one
			}
		default:
		}
		c.Close(websocket.StatusGoingAway, "local read failed")
		return err
	}
	if err := writeJSON(ctx, c, Control{EOF: true}); err != nil {
		return fmt.Errorf("ending the copy: %w", err)
	}
	select {
	case err := <-closed:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ExitStatus reads the end of an operation from the socket's close:
// "exit N" of a normal closure is N; any other close is an error carrying
// the server's reason.
func ExitStatus(err error) (int, error) {
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		return 0, fmt.Errorf("connection: %w", err)
	}
	if ce.Code == websocket.StatusNormalClosure {
		if s, ok := strings.CutPrefix(ce.Reason, "exit "); ok {
			if n, perr := strconv.Atoi(s); perr == nil {
				return n, nil
			}
		}
		return 0, nil
	}
	return 0, fmt.Errorf("%s (close code %d)", ce.Reason, ce.Code)
}

func writeJSON(ctx context.Context, c *websocket.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	return c.Write(wctx, websocket.MessageText, b)
}

// frameWriter sends what is written as binary frames of at most chunk
// bytes.
type frameWriter struct {
	ctx context.Context
	c   *websocket.Conn
}

func (w *frameWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), chunk)
		wctx, cancel := context.WithTimeout(w.ctx, writeTimeout)
		err := w.c.Write(wctx, websocket.MessageBinary, p[:k])
		cancel()
		if err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

func sendAll(ctx context.Context, c *websocket.Conn, r io.Reader) error {
	buf := make([]byte, 32<<10)
	fw := &frameWriter{ctx: ctx, c: c}
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := fw.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
