package envd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// watchers are E2B's non-streaming watches (CreateWatcher,
// GetWatcherEvents, RemoveWatcher). The guest agent queues each one's
// events (bounded, see proto.MaxWatchQueue); the host keeps only which
// guest watch a watcher id names, per sandbox, at most proto.MaxWatches
// each, and forgets those of agent connections that ended.
type watchers struct {
	mu   sync.Mutex
	byVM map[string]map[string]*watcher
}

type watcher struct {
	agent *client.Client
	watch *client.Watch
}

func (ws *watchers) add(vm string, wt *watcher) (string, *rpcError) {
	var b [12]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.byVM == nil {
		ws.byVM = map[string]map[string]*watcher{}
	}
	for v, m := range ws.byVM {
		for k, w := range m {
			select {
			case <-w.agent.Done():
				delete(m, k)
			default:
			}
		}
		if len(m) == 0 {
			delete(ws.byVM, v)
		}
	}
	if len(ws.byVM[vm]) >= proto.MaxWatches {
		return "", errf(codeResourceExhaust, "the sandbox has %d watchers, kiln's limit: remove one first", proto.MaxWatches)
	}
	if ws.byVM[vm] == nil {
		ws.byVM[vm] = map[string]*watcher{}
	}
	ws.byVM[vm][id] = wt
	return id, nil
}

func (ws *watchers) get(vm, id string) *watcher {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return ws.byVM[vm][id]
}

func (ws *watchers) drop(vm, id string) *watcher {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	w := ws.byVM[vm][id]
	delete(ws.byVM[vm], id)
	return w
}

// createWatcher is filesystem.Filesystem/CreateWatcher.
func (h *Handler) createWatcher(w http.ResponseWriter, r *http.Request) {
	var req watchRequest
	user, ok := h.readFSCall(w, r, &req)
	if !ok {
		return
	}
	p, e := checkWatch(req, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	a, vm, _, e := h.agent(ctx)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	wt, err := a.Watch(ctx, p, req.Recursive, user)
	if err != nil {
		writeUnaryError(w, watchError(err))
		return
	}
	id, e := h.watchers.add(vm, &watcher{agent: a, watch: wt})
	if e != nil {
		wt.Close()
		writeUnaryError(w, e)
		return
	}
	writeUnary(w, map[string]any{"watcherId": id})
}

type watcherRequest struct {
	WatcherID string `json:"watcherId"`
}

// getWatcherEvents is filesystem.Filesystem/GetWatcherEvents: the events
// since the last call (at most proto.MaxWatchEvents; call again for more).
func (h *Handler) getWatcherEvents(w http.ResponseWriter, r *http.Request) {
	var req watcherRequest
	if e := readUnary(w, r, &req); e != nil {
		writeUnaryError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	a, vm, _, e := h.agent(ctx)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	wt := h.watchers.get(vm, req.WatcherID)
	if wt != nil && wt.agent != a {
		// The guest drops watches with the session (a pause ends it).
		h.watchers.drop(vm, req.WatcherID)
		writeUnaryError(w, errf(codeNotFound, "watcher %q ended with the sandbox's agent session (the sandbox was paused or restarted): create it again", req.WatcherID))
		return
	}
	if wt == nil {
		writeUnaryError(w, errf(codeNotFound, "watcher %q not found", req.WatcherID))
		return
	}
	evs, err := wt.watch.Read(ctx, 0)
	if err != nil {
		// The guest closed it (overflow, directory gone) or lost it.
		h.watchers.drop(vm, req.WatcherID)
		writeUnaryError(w, watchError(err))
		return
	}
	writeUnary(w, map[string]any{"events": eventsOf(evs)})
}

// removeWatcher is filesystem.Filesystem/RemoveWatcher.
func (h *Handler) removeWatcher(w http.ResponseWriter, r *http.Request) {
	var req watcherRequest
	if e := readUnary(w, r, &req); e != nil {
		writeUnaryError(w, e)
		return
	}
	vm, _ := h.cfg.Target(r.Context())
	wt := h.watchers.drop(vm, req.WatcherID)
	if wt == nil {
		writeUnaryError(w, errf(codeNotFound, "watcher %q not found", req.WatcherID))
		return
	}
	wt.watch.Close()
	writeUnary(w, struct{}{})
}
