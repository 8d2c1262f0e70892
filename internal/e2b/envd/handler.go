// Package envd serves E2B's in-sandbox API (envd: processes and files, the
// calls the SDK makes at a sandbox's URL) on the host, for the endpoint
// proxy, translating each call to kiln's guest agent protocol: exec with
// streamed output, copy in and out as tar, list_dir. The proxy has already
// checked the envd access token and woken the VM; the guest never runs
// an envd of its own, so this works for every image, FROM scratch ones
// included, and everything the guest answers is bounded and checked here
// before a client sees it.
package envd

import (
	"context"
	"encoding/base64"
	"net/http"
	"strings"
	"sync"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Agents gives the guest agent of a running microVM (engine.Engine).
type Agents interface {
	Agent(ctx context.Context, id string) (*client.Client, error)
}

// ChangeNotifier is an Agents that tells when a microVM's state changes
// (engine.Engine): a process of a paused sandbox is then adopted as soon
// as the sandbox runs again, not at the next poll.
type ChangeNotifier interface {
	Changed(id string) <-chan struct{}
}

// Config configures a Handler.
type Config struct {
	Agents Agents
	// Sandboxes gives each sandbox's env vars (the E2B store).
	Sandboxes store.E2BStore
	// Target names the microVM and account of a request (set by the
	// endpoint proxy: proxy.MicrovmID, proxy.Account).
	Target func(ctx context.Context) (microvmID, account string)
	// App gives how a sandbox's template started its app (its ENV,
	// WORKDIR and USER), which commands start with by default, as E2B's
	// do; nil, or an empty App, runs them with the sandbox's env vars only.
	App func(ctx context.Context, account, microvmID string) (App, error)
	// MaxProcesses bounds the processes envd runs at once per sandbox
	// (each holds output buffers on the host); 0 is 256.
	MaxProcesses int
}

// App is a template's start-up configuration.
type App struct {
	Env        []string // KEY=VALUE
	WorkingDir string
	User       string
}

// Handler is envd for every sandbox.
type Handler struct {
	cfg Config
	mux *http.ServeMux

	mu       sync.Mutex
	procs    map[string]map[uint32]*proc // microVM → pid → running process
	starting map[string]int              // microVM → processes being started

	watchers watchers
}

// New returns envd.
func New(cfg Config) *Handler {
	if cfg.MaxProcesses <= 0 {
		cfg.MaxProcesses = 256
	}
	h := &Handler{cfg: cfg, mux: http.NewServeMux(), procs: map[string]map[uint32]*proc{}, starting: map[string]int{}}
	h.mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	h.mux.HandleFunc("POST /process.Process/Start", h.start)
	h.mux.HandleFunc("POST /process.Process/List", h.list)
	h.mux.HandleFunc("POST /process.Process/SendInput", h.sendInput)
	h.mux.HandleFunc("POST /process.Process/CloseStdin", h.closeStdin)
	h.mux.HandleFunc("POST /process.Process/SendSignal", h.sendSignal)
	h.mux.HandleFunc("POST /process.Process/Connect", h.connect)
	h.mux.HandleFunc("POST /process.Process/Update", h.update)
	h.mux.HandleFunc("POST /process.Process/StreamInput", h.streamInput)
	h.mux.HandleFunc("POST /filesystem.Filesystem/ListDir", h.listDir)
	h.mux.HandleFunc("POST /filesystem.Filesystem/Stat", h.stat)
	h.mux.HandleFunc("POST /filesystem.Filesystem/MakeDir", h.makeDir)
	h.mux.HandleFunc("POST /filesystem.Filesystem/Move", h.move)
	h.mux.HandleFunc("POST /filesystem.Filesystem/Remove", h.remove)
	h.mux.HandleFunc("POST /filesystem.Filesystem/WatchDir", h.watchDir)
	h.mux.HandleFunc("POST /filesystem.Filesystem/CreateWatcher", h.createWatcher)
	h.mux.HandleFunc("POST /filesystem.Filesystem/GetWatcherEvents", h.getWatcherEvents)
	h.mux.HandleFunc("POST /filesystem.Filesystem/RemoveWatcher", h.removeWatcher)
	h.mux.HandleFunc("GET /files", h.download)
	h.mux.HandleFunc("POST /files", h.upload)
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeUnaryError(w, errf(codeUnimplemented, "kiln's envd does not implement %s %s yet (docs/E2B.md lists what it does)", r.Method, r.URL.Path))
	})
	return h
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// userOf reads the user a call acts as: HTTP Basic with the user name and
// an empty password (the SDK's form), or ?username=. "" is root, kiln's
// default user (E2B's is "user", which kiln images need not have).
func userOf(r *http.Request) string {
	if u := r.URL.Query().Get("username"); u != "" {
		return u
	}
	a, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Basic ")
	if !ok || len(a) > 512 {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(a)
	if err != nil {
		return ""
	}
	name, _, _ := strings.Cut(string(b), ":")
	return name
}

// validUser accepts user names and uid[:gid] specs, nothing a shell or
// /etc/passwd parser could trip on.
func validUser(u string) bool {
	if len(u) > 64 {
		return false
	}
	for _, c := range u {
		if !(c == '_' || c == '-' || c == '.' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// homeOf is where relative paths of user u start.
func homeOf(u string) string {
	if u == "" || u == "root" || u == "0" {
		return "/root"
	}
	return "/home/" + u
}

func (h *Handler) agent(ctx context.Context) (*client.Client, string, string, *rpcError) {
	id, account := h.cfg.Target(ctx)
	if id == "" {
		return nil, "", "", errf(codeUnavailable, "no sandbox named by this request")
	}
	a, err := h.cfg.Agents.Agent(ctx, id)
	if err != nil {
		return nil, "", "", errf(codeUnavailable, "sandbox %s is not running: %v", id, err)
	}
	return a, id, account, nil
}
