package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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
		if p != nil {
			return // a second answer to this call: the first one stands
		}
		if err := proto.DecodeBody(m, &res); err != nil || res.ExecID == 0 || res.Pid <= 0 || res.Pid > 1<<22 {
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.procs[res.ExecID] != nil {
			// An id in use: the running Process would lose its output and
			// exit to the new one and never end (as Adopt refuses it).
			return
		}
		p = &Process{
			c: c, id: res.ExecID, pid: res.Pid, background: req.Background,
			out: make(chan proto.Output, outBuffer), exited: make(chan struct{}),
		}
		c.procs[res.ExecID] = p
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

// SessionDone is closed as soon as the agent connection the workload was
// started or adopted on is closed, which can be before Exited is: the read
// loop marks its processes lost only once it notices.
func (p *Process) SessionDone() <-chan struct{} { return p.c.done }

// push is called with c.mu held (on the read loop or in Adopt).
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

// finish is called with c.mu held, or on the read loop for a Process
// already out of c.procs.
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

// Bounds of what a session keeps for workloads nobody has adopted yet:
// the newest maxOrphans workloads (as many as envd runs per sandbox, so
// that every exit status waits for its adoption after a resume), each at
// most maxOrphanBytes of output (oldest chunks dropped first, counted in
// the adopted Process's Dropped), all together at most maxOrphanTotal
// (then new chunks are dropped, counted the same way).
const (
	maxOrphans     = 256
	maxOrphanBytes = 256 << 10
	maxOrphanTotal = 16 << 20
	// chunkOverhead is what a kept chunk costs besides its bytes, so that
	// many tiny chunks are bounded too.
	chunkOverhead = 128
)

// orphan is what arrived for a workload of an earlier session.
type orphan struct {
	seq     uint64
	out     []proto.Output
	bytes   int
	dropped uint64
	exit    *proto.Exit
}

// orphanLocked returns (creating) the orphan record of exec id; c.mu held.
func (c *Client) orphanLocked(id uint64) *orphan {
	o := c.orphans[id]
	if o != nil {
		return o
	}
	if len(c.orphans) >= maxOrphans {
		var oldest uint64
		for k, v := range c.orphans {
			if oldest == 0 || v.seq < c.orphans[oldest].seq {
				oldest = k
			}
		}
		c.orphanBytes -= c.orphans[oldest].bytes
		delete(c.orphans, oldest)
	}
	c.orphanSeq++
	o = &orphan{seq: c.orphanSeq}
	c.orphans[id] = o
	return o
}

// keepOrphanOutput holds a chunk for Adopt; c.mu held.
func (c *Client) keepOrphanOutput(out proto.Output) {
	o := c.orphanLocked(out.ExecID)
	size := len(out.Data) + chunkOverhead
	if c.orphanBytes+size > maxOrphanTotal {
		o.dropped += uint64(len(out.Data))
		return
	}
	o.out = append(o.out, out)
	o.bytes += size
	c.orphanBytes += size
	for o.bytes > maxOrphanBytes && len(o.out) > 1 {
		o.bytes -= len(o.out[0].Data) + chunkOverhead
		c.orphanBytes -= len(o.out[0].Data) + chunkOverhead
		o.dropped += uint64(len(o.out[0].Data))
		o.out[0] = proto.Output{} // its bytes go now, not at the next growth
		o.out = o.out[1:]
	}
}

// keepOrphanExit holds an exit for Adopt; c.mu held.
func (c *Client) keepOrphanExit(e proto.Exit) {
	c.orphanLocked(e.ExecID).exit = &e
}

// ErrLost is why an adopted workload ended without an exit status: it
// ended while no session was connected, or the guest rebooted.
var ErrLost = errors.New("the workload ended while no host session was connected; its exit status is lost")

// Adopt takes over a workload started by an earlier session of the same
// guest (exec id and pid from that session's Process), so its output and
// exit reach a Process of this one: what arrived since this session began
// comes first. The caller must know the guest is the same boot (BootID):
// exec ids restart with a guest's boot. Adopt asks the guest whether the
// workload still runs; one that ended unseen finishes with ErrLost.
func (c *Client) Adopt(ctx context.Context, execID uint64, pid int) (*Process, error) {
	if execID == 0 || pid <= 0 {
		return nil, errors.New("adopt: exec id and pid are required")
	}
	p := &Process{c: c, id: execID, pid: pid, out: make(chan proto.Output, outBuffer), exited: make(chan struct{})}
	c.mu.Lock()
	select {
	case <-c.done:
		c.mu.Unlock()
		return nil, fmt.Errorf("adopt: %w: %w", ErrClosed, c.err)
	default:
	}
	if c.procs[execID] != nil {
		c.mu.Unlock()
		return nil, fmt.Errorf("adopt: exec %d already has a process in this session", execID)
	}
	o := c.orphans[execID]
	delete(c.orphans, execID)
	if o != nil {
		c.orphanBytes -= o.bytes
	}
	if o != nil {
		if o.dropped > 0 {
			p.dropped.Add(o.dropped)
		}
		for _, out := range o.out {
			p.push(out)
		}
	}
	if o != nil && o.exit != nil {
		p.finish(*o.exit, nil)
		c.mu.Unlock()
		return p, nil
	}
	c.procs[execID] = p
	c.mu.Unlock()
	// An empty stdin write changes nothing; its answer tells whether the
	// guest still tracks the workload (agents of every version answer it,
	// so this works for guests suspended before kiln was upgraded).
	err := c.call(ctx, proto.TypeStdin, proto.StdinRequest{ExecID: execID}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("exec %d not found", execID)) {
		if err != nil && !strings.Contains(err.Error(), "stdin is closed") {
			c.mu.Lock()
			if c.procs[execID] == p {
				delete(c.procs, execID)
			}
			c.mu.Unlock()
			return nil, fmt.Errorf("adopt: %w", err)
		}
		return p, nil
	}
	// The guest forgets a workload only after queueing its exit: give that
	// exit a moment to arrive, whatever the caller's deadline (the wait is
	// short, and cutting it would lose an exit status that is on its way).
	select {
	case <-p.exited:
		return p, nil
	case <-time.After(2 * time.Second):
	}
	c.mu.Lock()
	if c.procs[execID] == p {
		delete(c.procs, execID)
		p.finish(proto.Exit{ExecID: execID}, ErrLost)
	}
	c.mu.Unlock()
	return p, nil
}

// Run executes a command and collects its output and exit code: for
// short commands (benchmarks, tests, the engine demo), as it holds all
// output in memory.
func (c *Client) Run(ctx context.Context, req ExecRequest) (stdout, stderr string, code int, err error) {
	p, err := c.Exec(ctx, req)
	if err != nil {
		return "", "", 0, err
	}
	var o, e bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		for chunk := range p.Output() {
			if chunk.Stream == proto.Stderr {
				e.Write(chunk.Data)
			} else {
				o.Write(chunk.Data)
			}
		}
	}()
	code, err = p.Wait(ctx)
	<-done
	return o.String(), e.String(), code, err
}
