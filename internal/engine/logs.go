//go:build linux

package engine

import (
	"context"
	"fmt"
	"sync"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/store"
)

var _ api.LogSource = (*Engine)(nil)

// logCap is how much of a microVM's output is kept (the newest bytes).
// It lives in memory only: a restart of kiln forgets it.
const logCap = 256 << 10

// ring keeps the newest logCap bytes of a stream with absolute offsets.
type ring struct {
	mu    sync.Mutex
	buf   []byte // the bytes from offset start
	start int64
}

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	if over := len(r.buf) - logCap; over > 0 {
		r.buf = append(r.buf[:0:0], r.buf[over:]...)
		r.start += int64(over)
	}
	return len(p), nil
}

func (r *ring) read(off int64, limit int) ([]byte, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	off = max(off, r.start)
	end := r.start + int64(len(r.buf))
	if off >= end {
		return nil, end
	}
	b := r.buf[off-r.start:]
	if len(b) > limit {
		b = b[:limit]
	}
	return append([]byte(nil), b...), off + int64(len(b))
}

func (e *Engine) logOf(id string) *ring {
	e.logMu.Lock()
	defer e.logMu.Unlock()
	if e.logs == nil {
		e.logs = map[string]*ring{}
	}
	r, ok := e.logs[id]
	if !ok {
		r = &ring{}
		e.logs[id] = r
	}
	return r
}

func (e *Engine) dropLog(id string) {
	e.logMu.Lock()
	delete(e.logs, id)
	e.logMu.Unlock()
}

// pumpLogs copies the app's output from the VM's current agent connection
// into its log until that connection ends (suspend, death, terminate);
// every start, resume and adoption starts a new pump.
func (e *Engine) pumpLogs(ctx context.Context, id string) {
	a, err := e.cfg.Driver.Agent(ctx, id)
	if err != nil {
		return
	}
	w := e.logOf(id)
	go func() {
		for r := range a.Logs() {
			if r.ExitCode != nil {
				fmt.Fprintf(w, "[kiln] the app exited with status %d\n", *r.ExitCode)
				continue
			}
			w.Write(r.Data)
			if r.Dropped > 0 {
				fmt.Fprintf(w, "[kiln] %d bytes of app output dropped\n", r.Dropped)
			}
		}
	}()
}

// MicrovmLog implements api.LogSource: the app's stdout and stderr.
func (e *Engine) MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	e.logMu.Lock()
	r := e.logs[m.ID]
	e.logMu.Unlock()
	if r == nil {
		return nil, offset, nil
	}
	data, next := r.read(offset, limit)
	return data, next, nil
}
