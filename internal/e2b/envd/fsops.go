package envd

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// callUser reads and checks the user a filesystem call acts as, as the
// guest agent names it: "" for root. A call that names no user acts as
// the template's USER, as its commands do (E2B's SDK leaves the default
// to the template); root when the template has none.
func (h *Handler) callUser(r *http.Request) (string, *rpcError) {
	u := userOf(r)
	if !validUser(u) {
		return "", errf(codeInvalidArgument, "user %q is not a valid user name", u)
	}
	if u == "" && h.cfg.App != nil {
		if id, account := h.cfg.Target(r.Context()); id != "" {
			app, err := h.cfg.App(r.Context(), account, id)
			if err != nil {
				return "", errf(codeInternal, "reading the template's configuration: %v", err)
			}
			u = app.User
		}
	}
	if u == "root" || u == "0" {
		u = ""
	}
	return u, nil
}

// readFSCall reads a unary filesystem call's message and user; on
// failure it has answered.
func (h *Handler) readFSCall(w http.ResponseWriter, r *http.Request, req any) (string, bool) {
	e := readUnary(w, r, req)
	user := ""
	if e == nil {
		user, e = h.callUser(r)
	}
	if e != nil {
		writeUnaryError(w, e)
		return "", false
	}
	return user, true
}

// fileOp runs one file operation of a unary call in the guest.
func (h *Handler) fileOp(r *http.Request, req proto.FileOpRequest) (proto.FileOpResult, *rpcError) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	a, _, _, e := h.agent(ctx)
	if e != nil {
		return proto.FileOpResult{}, e
	}
	res, err := a.FileOp(ctx, req)
	if err != nil {
		return proto.FileOpResult{}, classify(err)
	}
	return res, nil
}

// makeDir is filesystem.Filesystem/MakeDir: the directory and its missing
// parents, owned by the calling user; already_exists when it is there (the
// SDK's makeDir then returns false).
func (h *Handler) makeDir(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Path string `json:"path"`
	}
	user, ok := h.readFSCall(w, r, &req)
	if !ok {
		return
	}
	p, e := filePath(req.Path, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	res, e := h.fileOp(r, proto.FileOpRequest{Op: proto.OpMkdir, Path: p, User: user})
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	if !res.Created {
		writeUnaryError(w, errf(codeAlreadyExists, "directory %s already exists", p))
		return
	}
	writeUnary(w, map[string]any{"entry": entryOf(*res.Entry)})
}

// move is filesystem.Filesystem/Move (files.rename): the destination's
// missing parents are made.
func (h *Handler) move(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Source      string `json:"source"`
		Destination string `json:"destination"`
	}
	user, ok := h.readFSCall(w, r, &req)
	if !ok {
		return
	}
	src, e := filePath(req.Source, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	dst, e := filePath(req.Destination, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	res, e := h.fileOp(r, proto.FileOpRequest{Op: proto.OpMove, Path: src, Dest: dst, User: user})
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	writeUnary(w, map[string]any{"entry": entryOf(*res.Entry)})
}

// remove is filesystem.Filesystem/Remove: the path and all under it.
func (h *Handler) remove(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Path string `json:"path"`
	}
	user, ok := h.readFSCall(w, r, &req)
	if !ok {
		return
	}
	p, e := filePath(req.Path, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	if _, e := h.fileOp(r, proto.FileOpRequest{Op: proto.OpRemove, Path: p, User: user}); e != nil {
		writeUnaryError(w, e)
		return
	}
	writeUnary(w, struct{}{})
}

// eventTypes maps the agent's watch operations to filesystem.EventType.
var eventTypes = map[string]string{
	proto.WatchCreate: "EVENT_TYPE_CREATE",
	proto.WatchWrite:  "EVENT_TYPE_WRITE",
	proto.WatchRemove: "EVENT_TYPE_REMOVE",
	proto.WatchRename: "EVENT_TYPE_RENAME",
	proto.WatchChmod:  "EVENT_TYPE_CHMOD",
}

// fsEvent is filesystem.FilesystemEvent.
type fsEvent struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

func eventsOf(evs []proto.WatchEvent) []fsEvent {
	out := make([]fsEvent, 0, len(evs))
	for _, e := range evs {
		out = append(out, fsEvent{Name: e.Name, Type: eventTypes[e.Op]})
	}
	return out
}

// watchRequest is filesystem.WatchDirRequest and CreateWatcherRequest.
type watchRequest struct {
	Path               string `json:"path"`
	Recursive          bool   `json:"recursive"`
	IncludeEntry       bool   `json:"includeEntry"`
	AllowNetworkMounts bool   `json:"allowNetworkMounts"`
}

// checkWatch resolves a watch request's directory.
func checkWatch(req watchRequest, user string) (string, *rpcError) {
	if req.IncludeEntry {
		return "", errf(codeUnimplemented, "kiln's envd does not send entries with watch events yet: leave includeEntry unset")
	}
	if req.Path == "/" {
		return "/", nil
	}
	return filePath(req.Path, user)
}

// watchError maps a failed watch: an overflow is the client's to handle
// (watch again), a watch the guest no longer has is gone.
func watchError(err error) *rpcError {
	switch msg := err.Error(); {
	case errors.Is(err, client.ErrClosed):
		// The guest drops watches with the session (a pause ends it).
		return errf(codeUnavailable, "the watch ended with the sandbox's agent session (the sandbox was paused or restarted): watch the directory again")
	case strings.Contains(msg, proto.WatchOverflow):
		e := classify(err)
		e.Code = codeResourceExhaust
		return e
	case strings.Contains(msg, "watch ") && strings.Contains(msg, " not found"):
		return errf(codeNotFound, "the watcher is gone (the sandbox was paused or the watch failed): create it again")
	}
	return classify(err)
}

// watchDir is filesystem.Filesystem/WatchDir: a stream of a start event,
// then the directory's events as they come, keepalives between.
func (h *Handler) watchDir(w http.ResponseWriter, r *http.Request) {
	var req watchRequest
	if e := readStreamRequest(r, &req); e != nil {
		startStream(w).end(e)
		return
	}
	user, e := h.callUser(r)
	if e != nil {
		startStream(w).end(e)
		return
	}
	p, e := checkWatch(req, user)
	if e != nil {
		startStream(w).end(e)
		return
	}
	ctx := r.Context()
	a, _, _, e := h.agent(ctx)
	if e != nil {
		startStream(w).end(e)
		return
	}
	octx, cancel := context.WithTimeout(ctx, time.Minute)
	wt, err := a.Watch(octx, p, req.Recursive, user)
	cancel()
	if err != nil {
		startStream(w).end(watchError(err))
		return
	}
	defer wt.Close()
	s := startStream(w)
	if s.send(map[string]any{"start": struct{}{}}) != nil {
		return
	}
	// The guest waits at most its bound per read; a read that brings
	// nothing is the keepalive.
	wait := min(keepalive(r), proto.MaxWatchWaitMillis*time.Millisecond)
	for {
		rctx, cancel := context.WithTimeout(ctx, wait+30*time.Second)
		evs, err := wt.Read(rctx, wait)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.end(watchError(fmt.Errorf("watching %s: %w", p, err)))
			return
		}
		if len(evs) == 0 {
			if s.send(map[string]any{"keepalive": struct{}{}}) != nil {
				return
			}
			continue
		}
		for _, ev := range eventsOf(evs) {
			if s.send(map[string]any{"filesystem": ev}) != nil {
				return
			}
		}
	}
}
