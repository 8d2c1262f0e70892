package envd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Bounds of what one process holds on the host: the streams attached to
// it (its Start stream and Connect streams) and the events queued for each
// (a chunk is at most proto.MaxChunk, so 2 MiB per slow stream).
const (
	maxSubscribers = 8
	subBuffer      = 32
)

// proc is a process envd started. One goroutine (fanOut) reads its output
// from the agent and hands each chunk to every attached stream, so a
// process outlives the stream that started it and can be reattached
// (Connect), as with E2B's envd. Output nobody is attached to is dropped.
// It also outlives the agent session it started on: a paused sandbox
// keeps its memory and so its processes, and on resume the process is
// adopted into the new session (adopt).
type proc struct {
	cfg    processConfig
	tag    string
	pty    bool
	bootID string // the guest boot it runs in: exec ids restart with a boot

	adoptMu sync.Mutex // one adoption at a time

	mu   sync.Mutex
	p    *client.Process // the handle in the current agent session
	subs map[chan processEvent]struct{}
	// end is the End event, or endErr why the process was lost; both are
	// valid once done is closed.
	end    *endEvent
	endErr *rpcError
	done   chan struct{}
}

func newProc(p *client.Process, cfg processConfig, tag string, pty bool, bootID string) *proc {
	return &proc{p: p, cfg: cfg, tag: tag, pty: pty, bootID: bootID, subs: map[chan processEvent]struct{}{}, done: make(chan struct{})}
}

func (pr *proc) cur() *client.Process {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.p
}

// adopt moves pr from old, the handle of an agent session that ended, to
// the sandbox's current session. retry says the sandbox does not run yet
// (paused, resuming) and a later try may succeed; without it an error
// means the process is gone with its sandbox (killed, or restarted
// without its memory).
func (h *Handler) adopt(ctx context.Context, id string, pr *proc, old *client.Process) (np *client.Process, retry bool, err error) {
	pr.adoptMu.Lock()
	defer pr.adoptMu.Unlock()
	if cur := pr.cur(); cur != old {
		return cur, false, nil // adopted meanwhile
	}
	a, err := h.cfg.Agents.Agent(ctx, id)
	if err != nil {
		return nil, errors.Is(err, errdefs.ErrConflict), err
	}
	select {
	case <-a.Done():
		// The driver has not noticed the session's end yet.
		return nil, true, fmt.Errorf("the sandbox's agent session ended: %w", a.Err())
	default:
	}
	if a.BootID() != pr.bootID {
		return nil, false, errors.New("the sandbox restarted without its memory; its processes are gone")
	}
	np, err = a.Adopt(ctx, old.ID(), old.Pid())
	if err != nil {
		// A session that ended, a probe that timed out (an agent from
		// before the probe was answered at once waits behind a stdin write
		// the workload does not read) or a busy agent says nothing of the
		// process: try again later.
		busy := errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "agent busy")
		return nil, a.Err() != nil || busy, err
	}
	pr.mu.Lock()
	pr.p = np
	pr.mu.Unlock()
	return np, false, nil
}

// maxDetached bounds how long a process waits for its sandbox to run
// again: longer than a paused sandbox is kept (8 hours), so only a driver
// that never settles (a dead session it keeps answering with) ends it.
const maxDetached = 24 * time.Hour

// reattach waits, as long as the sandbox exists, until it runs again and
// adopts pr into its new agent session: at once when the engine says the
// sandbox changed state (the agent keeps only the first 256 KiB a process
// writes before it is adopted), else at the next poll.
func (h *Handler) reattach(id string, pr *proc, old *client.Process) (*client.Process, error) {
	delay := reattachPoll[0]
	for start := time.Now(); ; {
		var changed <-chan struct{}
		if n, ok := h.cfg.Agents.(ChangeNotifier); ok {
			changed = n.Changed(id) // before the try: no change is missed
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		np, retry, err := h.adopt(ctx, id, pr, old)
		cancel()
		if np != nil || !retry {
			return np, err
		}
		if time.Since(start) > maxDetached {
			return nil, fmt.Errorf("the sandbox did not run again within %v: %w", maxDetached, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-changed:
		case <-t.C:
		}
		t.Stop()
		delay = min(2*delay, reattachPoll[1])
	}
}

// reattachPoll is reattach's first and longest wait between tries.
var reattachPoll = [2]time.Duration{100 * time.Millisecond, time.Second}

// live is the handle to act on pr with now: adopted into the current
// agent session first if its own session ended.
func (h *Handler) live(ctx context.Context, id string, pr *proc) (*client.Process, *rpcError) {
	p := pr.cur()
	select {
	case <-p.Exited():
	case <-p.SessionDone():
	default:
		return p, nil
	}
	if _, err := p.Wait(ctx); !errors.Is(err, client.ErrClosed) {
		return p, nil // it ended: the call itself says so
	}
	np, _, err := h.adopt(ctx, id, pr, p)
	if err != nil {
		return nil, errf(codeUnavailable, "process %d ran in an earlier agent session of the sandbox and is not reattached yet (is the sandbox paused?): %v", p.Pid(), err)
	}
	return np, nil
}

// subscribe attaches a stream. It fails once the process has ended or
// when maxSubscribers are attached.
func (pr *proc) subscribe() (chan processEvent, *rpcError) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	select {
	case <-pr.done:
		return nil, errf(codeNotFound, "the process has ended")
	default:
	}
	if len(pr.subs) >= maxSubscribers {
		return nil, errf(codeResourceExhaust, "%d streams are already attached to this process", maxSubscribers)
	}
	ch := make(chan processEvent, subBuffer)
	pr.subs[ch] = struct{}{}
	return ch, nil
}

func (pr *proc) unsubscribe(ch chan processEvent) {
	pr.mu.Lock()
	delete(pr.subs, ch)
	pr.mu.Unlock()
}

// broadcast never blocks on a slow stream: its oldest event goes.
func (pr *proc) broadcast(ev processEvent) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	for ch := range pr.subs {
		for {
			select {
			case ch <- ev:
			default:
				select {
				case <-ch:
				default:
				}
				continue
			}
			break
		}
	}
}

// fanOut runs for the life of a process: it spreads its output and, at
// its end, stops tracking it and records the End event (in that order: a
// client that saw the end finds the pid gone).
func (h *Handler) fanOut(id string, pid uint32, pr *proc) {
	p := pr.cur()
	var code int
	var err error
	for {
		for o := range p.Output() {
			if len(o.Data) == 0 {
				continue
			}
			d := &dataEvent{Stdout: o.Data}
			switch {
			case pr.pty:
				d = &dataEvent{Pty: o.Data}
			case o.Stream == proto.Stderr:
				d = &dataEvent{Stderr: o.Data}
			}
			pr.broadcast(processEvent{Data: d})
		}
		// Output is closed only once the process exited or the agent went.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		code, err = p.Wait(ctx)
		cancel()
		if !errors.Is(err, client.ErrClosed) {
			break
		}
		// The session ended (the sandbox paused, or died): the process
		// lives on in a kept memory, so follow it into the next session.
		np, aerr := h.reattach(id, pr, p)
		if np == nil {
			err = aerr
			break
		}
		p = np
	}
	h.untrack(id, pid, pr)
	pr.mu.Lock()
	switch {
	case errors.Is(err, client.ErrLost):
		// The sandbox is fine; only the process's exit status is gone.
		pr.endErr = errf(codeUnavailable, "the process ended, but its exit status was lost: %v", err)
	case err != nil:
		pr.endErr = errf(codeUnavailable, "lost the sandbox while the process ran: %v", err)
	default:
		pr.end = &endEvent{ExitCode: int32(code), Exited: true, Status: fmt.Sprintf("exit status %d", code)}
		if sig := p.ExitSignal(); sig != 0 {
			pr.end.Exited, pr.end.Status = false, fmt.Sprintf("signal: %d", sig)
		}
	}
	close(pr.done)
	pr.mu.Unlock()
}

// follow streams a subscription's events until the process ends (then its
// End event) or the client goes.
func follow(ctx context.Context, s *stream, pr *proc, ch chan processEvent, every time.Duration) *rpcError {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case ev := <-ch:
			if s.send(startResponse{ev}) != nil {
				return nil
			}
		case <-pr.done:
			// Every broadcast happened before done: drain, then the end.
			for {
				select {
				case ev := <-ch:
					if s.send(startResponse{ev}) != nil {
						return nil
					}
					continue
				default:
				}
				break
			}
			if pr.endErr != nil {
				return pr.endErr
			}
			s.send(startResponse{processEvent{End: pr.end}})
			return nil
		case <-tick.C:
			if s.send(startResponse{processEvent{Keepalive: &struct{}{}}}) != nil {
				return nil
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// connect is process.Process/Connect (commands.connect, pty.connect):
// attach to a running process by pid or tag and stream its output from
// now on, then its end.
func (h *Handler) connect(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Process *selector `json:"process"`
	}
	if e := readStreamRequest(r, &req); e != nil {
		startStream(w).end(e)
		return
	}
	id, _ := h.cfg.Target(r.Context())
	pr, e := h.find(id, req.Process)
	if e != nil {
		startStream(w).end(e)
		return
	}
	sub, e := pr.subscribe()
	if e != nil {
		startStream(w).end(e)
		return
	}
	defer pr.unsubscribe(sub)
	s := startStream(w)
	if s.send(startResponse{processEvent{Start: &startEvent{Pid: uint32(pr.cur().Pid())}}}) != nil {
		return
	}
	s.end(follow(r.Context(), s, pr, sub, keepalive(r)))
}

// update is process.Process/Update (pty.resize).
func (h *Handler) update(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Process *selector  `json:"process"`
		Pty     *ptyConfig `json:"pty"`
	}
	h.onProcess(w, r, &req, func() *selector { return req.Process }, func(ctx context.Context, t *proc, p *client.Process) *rpcError {
		if req.Pty == nil {
			return nil // nothing to change
		}
		if !t.pty {
			return errf(codeInvalidArgument, "the process was started without a pty; only a PTY can be resized")
		}
		cols, rows, e := req.Pty.size()
		if e != nil {
			return e
		}
		if err := p.Resize(ctx, cols, rows); err != nil {
			return classify(err)
		}
		return nil
	})
}

// streamInputMsg is process.StreamInputRequest: first start (which
// process), then data and keepalives.
type streamInputMsg struct {
	Start *struct {
		Process *selector `json:"process"`
	} `json:"start"`
	Data *struct {
		Input *processInput `json:"input"`
	} `json:"data"`
	Keepalive *struct{} `json:"keepalive"`
}

// nextInput reads one message of a client stream; io.EOF at its clean end.
func nextInput(r io.Reader) (streamInputMsg, *rpcError, error) {
	var m streamInputMsg
	flags, msg, err := readEnvelope(r, maxMessage)
	if errors.Is(err, io.EOF) {
		return m, nil, io.EOF
	}
	if err != nil {
		return m, errf(codeInvalidArgument, "reading the input stream: %v", err), nil
	}
	if flags&flagCompressed != 0 {
		return m, errf(codeUnimplemented, "compressed messages are not supported"), nil
	}
	if flags&flagEndStream != 0 {
		return m, nil, io.EOF
	}
	if e := decodeMessage(msg, &m); e != nil {
		return m, e, nil
	}
	return m, nil, nil
}

// streamInput is process.Process/StreamInput, a client stream: a start
// message naming the process, then input in order. The answer, one empty
// message, comes once the client's stream ends.
func (h *Handler) streamInput(w http.ResponseWriter, r *http.Request) {
	if ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";"); strings.TrimSpace(ct) != contentStream {
		startStream(w).end(errf(codeInvalidArgument, "content type %q: kiln's envd speaks Connect streams with JSON (application/connect+json)", ct))
		return
	}
	id, _ := h.cfg.Target(r.Context())
	first, e, err := nextInput(r.Body)
	if err != nil || e == nil && (first.Start == nil || first.Data != nil) {
		e = errf(codeInvalidArgument, "the input stream must start with a start message naming the process")
	}
	var pr *proc
	if e == nil {
		pr, e = h.find(id, first.Start.Process)
	}
	for e == nil {
		m, me, err := nextInput(r.Body)
		if errors.Is(err, io.EOF) {
			break
		}
		switch {
		case me != nil:
			e = me
		case m.Start != nil:
			e = errf(codeInvalidArgument, "a second start message in the input stream")
		case m.Data != nil:
			ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
			var p *client.Process
			if p, e = h.live(ctx, id, pr); e == nil {
				e = m.Data.Input.write(ctx, pr, p)
			}
			cancel()
		}
	}
	s := startStream(w)
	if e != nil {
		s.end(e)
		return
	}
	if s.send(struct{}{}) == nil {
		s.end(nil)
	}
}
