package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// Process is a workload running in the guest.
type Process struct {
	c          *Client
	id         uint64
	pid        int
	background bool

	out     chan proto.Output
	dropped atomic.Uint64

	exited chan struct{}
	exit   proto.Exit
	err    error
	once   sync.Once

	stdinMu sync.Mutex
}

// Exec starts a workload. The Process outlives ctx, which bounds only the
// start. It fails while the workloads are frozen (between Freeze and
// Restore).
func (c *Client) Exec(ctx context.Context, req ExecRequest) (*Process, error) {
	if len(req.Argv) == 0 {
		return nil, errors.New("exec: empty argv")
	}
	var p *Process
	err := c.call(ctx, proto.TypeExec, proto.ExecRequest{
		Argv: req.Argv, Env: req.Env, Cwd: req.Cwd, User: req.User,
		Stdin: req.Stdin, TTY: req.TTY, Cols: req.Cols, Rows: req.Rows, Background: req.Background, Caps: req.Caps,
	}, nil, func(m proto.Message) {
		// On the read loop: register before the next frame (which may be
		// this workload's first output) is handled.
		var res proto.ExecResult
		// Linux pids are 1 to 2^22 (PID_MAX_LIMIT); envd names processes by pid.
		if err := proto.DecodeBody(m, &res); err != nil || res.ExecID == 0 || res.Pid <= 0 || res.Pid > 1<<22 {
			return
		}
		p = &Process{
			c: c, id: res.ExecID, pid: res.Pid, background: req.Background,
			out: make(chan proto.Output, outBuffer), exited: make(chan struct{}),
		}
		c.mu.Lock()
		c.procs[res.ExecID] = p
		c.mu.Unlock()
	})
	if err != nil {
		return nil, err
	}
	if p == nil {
		return nil, errors.New("exec: agent sent an invalid exec result")
	}
	return p, nil
}

// ID is the agent's id for this workload (LogRecord.ExecID).
func (p *Process) ID() uint64 { return p.id }

// Pid is the workload's process id in the guest.
func (p *Process) Pid() int { return p.pid }

// Output returns the workload's stdout and stderr chunks in order. It is
// closed after the last chunk, once the workload exited (or the connection
// was lost). At most 256 chunks wait here: when the caller falls behind the
// oldest are dropped (see Dropped). Background workloads send their output
// to Client.Logs instead.
func (p *Process) Output() <-chan proto.Output { return p.out }

// Dropped counts output bytes lost, in the guest or here, because the
// reader fell behind.
func (p *Process) Dropped() uint64 { return p.dropped.Load() }

// Exited is closed when the workload has exited or the connection is lost.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// push is called on the read loop only.
func (p *Process) push(o proto.Output) {
	if o.Dropped > 0 {
		p.dropped.Add(o.Dropped)
	}
	for {
		select {
		case p.out <- o:
			return
		default:
		}
		select {
		case old := <-p.out:
			p.dropped.Add(uint64(len(old.Data)))
		default:
		}
	}
}

// finish is called on the read loop only.
func (p *Process) finish(e proto.Exit, err error) {
	p.once.Do(func() {
		p.exit, p.err = e, err
		close(p.out)
		close(p.exited)
	})
}

// Wait waits for the workload to exit and returns its exit code (128+signal
// when killed by a signal).
func (p *Process) Wait(ctx context.Context) (int, error) {
	select {
	case <-p.exited:
		if p.err != nil {
			return -1, p.err
		}
		return p.exit.Code, nil
	case <-ctx.Done():
		return -1, fmt.Errorf("waiting for exec %d: %w", p.id, ctx.Err())
	}
}

// ExitSignal returns the signal that ended the workload (valid after Wait),
// 0 if it exited normally.
func (p *Process) ExitSignal() int { return p.exit.Signal }

// Write writes to the workload's stdin (ExecRequest.Stdin must be set).
func (p *Process) Write(ctx context.Context, b []byte) error {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	for len(b) > 0 {
		n := min(len(b), proto.MaxChunk)
		if err := p.c.callData(ctx, proto.TypeStdin, proto.StdinRequest{ExecID: p.id}, b[:n], nil, nil); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// CloseStdin closes the workload's stdin (sends ^D on a TTY).
func (p *Process) CloseStdin(ctx context.Context) error {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	return p.c.call(ctx, proto.TypeStdin, proto.StdinRequest{ExecID: p.id, Close: true}, nil, nil)
}

// Resize sets the TTY size of a workload started with TTY.
func (p *Process) Resize(ctx context.Context, cols, rows uint16) error {
	return p.c.call(ctx, proto.TypeResize, proto.ResizeRequest{ExecID: p.id, Cols: cols, Rows: rows}, nil, nil)
}

// Signal sends signal sig (e.g. 15 for SIGTERM) to the workload.
func (p *Process) Signal(ctx context.Context, sig int) error {
	return p.c.call(ctx, proto.TypeSignal, proto.SignalRequest{ExecID: p.id, Signal: sig}, nil, nil)
}
