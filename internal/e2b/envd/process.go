package envd

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// processConfig is process.ProcessConfig.
type processConfig struct {
	Cmd  string            `json:"cmd"`
	Args []string          `json:"args,omitempty"`
	Envs map[string]string `json:"envs,omitempty"`
	Cwd  *string           `json:"cwd,omitempty"`
}

// startRequest is process.StartRequest.
type startRequest struct {
	Process *processConfig `json:"process"`
	Pty     *ptyConfig     `json:"pty"`
	Tag     *string        `json:"tag"`
	Stdin   *bool          `json:"stdin"`
}

// ptyConfig is process.PTY.
type ptyConfig struct {
	Size *struct {
		Cols uint32 `json:"cols"`
		Rows uint32 `json:"rows"`
	} `json:"size"`
}

// maxPtySide bounds a terminal's columns and rows (the kernel's winsize
// holds 16 bits; no real terminal comes near this).
const maxPtySide = 4096

// size checks a PTY size: both sides set and within maxPtySide.
func (c *ptyConfig) size() (cols, rows uint16, e *rpcError) {
	if c == nil || c.Size == nil || c.Size.Cols == 0 || c.Size.Rows == 0 || c.Size.Cols > maxPtySide || c.Size.Rows > maxPtySide {
		return 0, 0, errf(codeInvalidArgument, "pty.size needs cols and rows from 1 to %d", maxPtySide)
	}
	return uint16(c.Size.Cols), uint16(c.Size.Rows), nil
}

// Bounds of a command: what the kernel's argv and environment can take.
const (
	maxArgs     = 4096
	maxArgBytes = 256 << 10
	maxEnvs     = 1024
)

// checkStart validates a StartRequest.
func checkStart(req startRequest) *rpcError {
	c := req.Process
	switch {
	case c == nil || c.Cmd == "":
		return errf(codeInvalidArgument, "process.cmd is required")
	case len(c.Args) > maxArgs || len(c.Envs) > maxEnvs:
		return errf(codeInvalidArgument, "at most %d arguments and %d environment variables", maxArgs, maxEnvs)
	case req.Tag != nil && len(*req.Tag) > 256:
		return errf(codeInvalidArgument, "tag longer than 256 bytes")
	}
	n := len(c.Cmd)
	bad := strings.ContainsRune(c.Cmd, 0)
	for _, a := range c.Args {
		n += len(a) + 1
		bad = bad || strings.ContainsRune(a, 0)
	}
	for k, v := range c.Envs {
		n += len(k) + len(v) + 2
		bad = bad || k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0)
	}
	if req.Pty != nil {
		if _, _, e := req.Pty.size(); e != nil {
			return e
		}
	}
	if c.Cwd != nil {
		bad = bad || len(*c.Cwd) > 4096 || strings.ContainsRune(*c.Cwd, 0)
	}
	if bad {
		return errf(codeInvalidArgument, "command, arguments, environment names and values and cwd must not contain NUL bytes; names not '='")
	}
	if n > maxArgBytes {
		return errf(codeInvalidArgument, "command, arguments and environment hold %d bytes; at most %d", n, maxArgBytes)
	}
	return nil
}

// processEvent is process.ProcessEvent (JSON: the oneof's member).
type processEvent struct {
	Start     *startEvent `json:"start,omitempty"`
	Data      *dataEvent  `json:"data,omitempty"`
	End       *endEvent   `json:"end,omitempty"`
	Keepalive *struct{}   `json:"keepalive,omitempty"`
}

type startEvent struct {
	Pid uint32 `json:"pid"`
}

type dataEvent struct {
	Stdout []byte `json:"stdout,omitempty"` // base64 in JSON, as protobuf bytes
	Stderr []byte `json:"stderr,omitempty"`
	Pty    []byte `json:"pty,omitempty"`
}

type endEvent struct {
	ExitCode int32   `json:"exitCode"`
	Exited   bool    `json:"exited"`
	Status   string  `json:"status"`
	Error    *string `json:"error,omitempty"`
}

type startResponse struct {
	Event processEvent `json:"event"`
}

// keepalive is how often a stream with no output sends a keepalive: the
// SDK asks (Keepalive-Ping-Interval, seconds), within bounds.
func keepalive(r *http.Request) time.Duration {
	n, err := strconv.Atoi(r.Header.Get("Keepalive-Ping-Interval"))
	if err != nil || n < 1 || n > 300 {
		n = 50
	}
	return time.Duration(n) * time.Second
}

func (h *Handler) start(w http.ResponseWriter, r *http.Request) {
	var req startRequest
	if e := readStreamRequest(r, &req); e != nil {
		startStream(w).end(e)
		return
	}
	if e := checkStart(req); e != nil {
		startStream(w).end(e)
		return
	}
	user := userOf(r)
	if !validUser(user) {
		startStream(w).end(errf(codeInvalidArgument, "user %q is not a valid user name", user))
		return
	}
	ctx := r.Context()
	a, id, account, e := h.agent(ctx)
	if e != nil {
		startStream(w).end(e)
		return
	}
	app, env, err := h.sandboxEnv(ctx, account, id)
	if err != nil {
		startStream(w).end(errf(codeInternal, "reading the sandbox's env vars: %v", err))
		return
	}
	for k, v := range req.Process.Envs {
		env[k] = v
	}
	envList := make([]string, 0, len(env))
	for k, v := range env {
		envList = append(envList, k+"="+v)
	}
	slices.Sort(envList)
	if user == "" {
		// The template's USER; it is the one its app runs as, so the
		// agent knows it whatever its form (name, uid, uid:gid).
		user = app.User
	}
	cwd := app.WorkingDir
	if req.Process.Cwd != nil && *req.Process.Cwd != "" {
		cwd = resolvePath(*req.Process.Cwd, homeOf(user))
	}
	tty := req.Pty != nil
	var cols, rows uint16
	if tty {
		cols, rows, _ = req.Pty.size() // checked by checkStart
	}
	if e := h.reserve(id); e != nil {
		startStream(w).end(e)
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	p, err := a.Exec(sctx, client.ExecRequest{Argv: append([]string{req.Process.Cmd}, req.Process.Args...),
		Env: envList, Cwd: cwd, User: user, Stdin: tty || req.Stdin != nil && *req.Stdin, TTY: tty, Cols: cols, Rows: rows})
	cancel()
	s := startStream(w)
	if err != nil {
		h.release(id)
		s.end(classify(fmt.Errorf("starting %s: %w", req.Process.Cmd, err)))
		return
	}
	tag := ""
	if req.Tag != nil {
		tag = *req.Tag
	}
	pr := newProc(p, *req.Process, tag, tty, a.BootID())
	// Subscribe before the fan-out starts: the starting stream misses nothing.
	sub, _ := pr.subscribe()
	defer pr.unsubscribe(sub)
	pid := uint32(p.Pid())
	h.track(id, pid, pr)
	go h.fanOut(id, pid, pr)
	if s.send(startResponse{processEvent{Start: &startEvent{Pid: pid}}}) != nil {
		return
	}
	s.end(follow(ctx, s, pr, sub, keepalive(r)))
}

// sandboxEnv is the environment a command starts with: the template's
// (its app's), then the sandbox's env vars over it.
func (h *Handler) sandboxEnv(ctx context.Context, account, id string) (App, map[string]string, error) {
	env := map[string]string{}
	var app App
	if h.cfg.App != nil {
		a, err := h.cfg.App(ctx, account, id)
		if err != nil {
			return app, nil, fmt.Errorf("reading the template's configuration: %w", err)
		}
		app = a
		for _, kv := range app.Env {
			if k, v, ok := strings.Cut(kv, "="); ok && k != "" {
				env[k] = v
			}
		}
	}
	sb, err := h.cfg.Sandboxes.GetE2BSandbox(ctx, account, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return app, env, nil
	}
	if err != nil {
		return app, nil, err
	}
	for k, v := range sb.EnvVars {
		env[k] = v
	}
	return app, env, nil
}

// reserve counts a process about to start against the sandbox's bound.
func (h *Handler) reserve(id string) *rpcError {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.procs[id])+h.starting[id] >= h.cfg.MaxProcesses {
		return errf(codeResourceExhaust, "sandbox %s already runs %d processes started through envd; wait for some to end or kill them", id, h.cfg.MaxProcesses)
	}
	h.starting[id]++
	return nil
}

func (h *Handler) release(id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.releaseLocked(id)
}

func (h *Handler) releaseLocked(id string) {
	if h.starting[id]--; h.starting[id] <= 0 {
		delete(h.starting, id)
	}
}

// track turns a reservation into a tracked process. A pid the guest
// reports twice replaces the older entry, whose fan-out then leaves the
// map alone (untrack compares).
func (h *Handler) track(id string, pid uint32, pr *proc) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.releaseLocked(id)
	m := h.procs[id]
	if m == nil {
		m = map[uint32]*proc{}
		h.procs[id] = m
	}
	m[pid] = pr
}

func (h *Handler) untrack(id string, pid uint32, pr *proc) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.procs[id][pid] == pr {
		delete(h.procs[id], pid)
		if len(h.procs[id]) == 0 {
			delete(h.procs, id)
		}
	}
}

// selector is process.ProcessSelector.
type selector struct {
	Pid *uint32 `json:"pid"`
	Tag *string `json:"tag"`
}

func (h *Handler) find(id string, sel *selector) (*proc, *rpcError) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if sel != nil && sel.Pid != nil {
		if t := h.procs[id][*sel.Pid]; t != nil {
			return t, nil
		}
		return nil, errf(codeNotFound, "process %d not found (kiln's envd knows the processes it started)", *sel.Pid)
	}
	if sel != nil && sel.Tag != nil {
		for _, t := range h.procs[id] {
			if t.tag == *sel.Tag {
				return t, nil
			}
		}
		return nil, errf(codeNotFound, "no process with tag %q", *sel.Tag)
	}
	return nil, errf(codeInvalidArgument, "process selector (pid or tag) is required")
}

type processInfo struct {
	Config processConfig `json:"config"`
	Pid    uint32        `json:"pid"`
	Tag    *string       `json:"tag,omitempty"`
}

func (h *Handler) list(w http.ResponseWriter, r *http.Request) {
	var req struct{}
	if e := readUnary(w, r, &req); e != nil {
		writeUnaryError(w, e)
		return
	}
	id, _ := h.cfg.Target(r.Context())
	h.mu.Lock()
	out := []processInfo{}
	for pid, t := range h.procs[id] {
		pi := processInfo{Config: t.cfg, Pid: pid}
		if t.tag != "" {
			tag := t.tag
			pi.Tag = &tag
		}
		out = append(out, pi)
	}
	h.mu.Unlock()
	slices.SortFunc(out, func(a, b processInfo) int { return int(a.Pid) - int(b.Pid) })
	writeUnary(w, map[string]any{"processes": out})
}

// onProcess decodes a unary request into req, finds the process its
// selector names, and answers with what fn does to it.
func (h *Handler) onProcess(w http.ResponseWriter, r *http.Request, req any, sel func() *selector, fn func(context.Context, *proc, *client.Process) *rpcError) {
	if e := readUnary(w, r, req); e != nil {
		writeUnaryError(w, e)
		return
	}
	id, _ := h.cfg.Target(r.Context())
	t, e := h.find(id, sel())
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	p, e := h.live(ctx, id, t)
	if e == nil {
		e = fn(ctx, t, p)
	}
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	writeUnary(w, struct{}{})
}

// processInput is process.ProcessInput: one of stdin and pty.
type processInput struct {
	Stdin []byte `json:"stdin"`
	Pty   []byte `json:"pty"`
}

// write sends input to a process: pty input only to a PTY, stdin to
// either (a PTY's input is its stdin).
func (in *processInput) write(ctx context.Context, t *proc, p *client.Process) *rpcError {
	switch {
	case in == nil || in.Stdin == nil && in.Pty == nil:
		return errf(codeInvalidArgument, "input.stdin or input.pty is required")
	case in.Pty != nil && !t.pty:
		return errf(codeInvalidArgument, "input.pty is for PTY processes; this one was started without a pty: send input.stdin")
	}
	data := in.Stdin
	if in.Pty != nil {
		data = in.Pty
	}
	if err := p.Write(ctx, data); err != nil {
		return classify(err)
	}
	return nil
}

func (h *Handler) sendInput(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Process *selector     `json:"process"`
		Input   *processInput `json:"input"`
	}
	h.onProcess(w, r, &req, func() *selector { return req.Process }, func(ctx context.Context, t *proc, p *client.Process) *rpcError {
		return req.Input.write(ctx, t, p)
	})
}

func (h *Handler) closeStdin(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Process *selector `json:"process"`
	}
	h.onProcess(w, r, &req, func() *selector { return req.Process }, func(ctx context.Context, t *proc, p *client.Process) *rpcError {
		if err := p.CloseStdin(ctx); err != nil {
			return classify(err)
		}
		return nil
	})
}

// signalOf reads process.Signal, by name or number as protobuf JSON allows.
func signalOf(raw any) (int, bool) {
	switch v := raw.(type) {
	case string:
		switch v {
		case "SIGNAL_SIGKILL":
			return 9, true
		case "SIGNAL_SIGTERM":
			return 15, true
		}
	case float64:
		if v == 9 || v == 15 {
			return int(v), true
		}
	}
	return 0, false
}

func (h *Handler) sendSignal(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Process *selector `json:"process"`
		Signal  any       `json:"signal"`
	}
	h.onProcess(w, r, &req, func() *selector { return req.Process }, func(ctx context.Context, t *proc, p *client.Process) *rpcError {
		sig, ok := signalOf(req.Signal)
		if !ok {
			return errf(codeInvalidArgument, "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
		}
		if err := p.Signal(ctx, sig); err != nil {
			return classify(err)
		}
		return nil
	})
}

// resolvePath makes p absolute (relative to home) and clean.
func resolvePath(p, home string) string {
	if !path.IsAbs(p) {
		p = path.Join(home, p)
	}
	return path.Clean(p)
}
