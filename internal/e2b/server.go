// Package e2b serves E2B's public control API (the REST routes the
// official E2B SDKs call at E2B_API_URL, authenticated by X-API-Key) on
// kiln's microVMs. It is an adapter like the web console: every lifecycle
// operation runs in-process through api.Server.SessionHandler, the very
// handlers of the AWS API (validation, quotas, rate limit, idempotency,
// records, backend calls), with the caller's account as principal. A
// sandbox is a microVM of that account: the E2B store keeps only what E2B
// adds (template name, metadata, env vars for envd's processes).
package e2b

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// EnvdVersion is the envd version kiln's envd reports: the SDK enables
// features by it (0.5.7: closing stdin, octet-stream uploads).
const EnvdVersion = "0.5.7"

// EnvdPort is the port the SDK addresses envd at (E2b-Sandbox-Port, or
// the 49983- prefix of the sandbox host).
const EnvdPort = 49983

// Timeouts of sandboxes, in seconds: E2B's default when the request names
// none, and kiln's cap (api.MaxDurationSeconds, 8 hours).
const (
	DefaultTimeout = 15
	MaxTimeout     = api.MaxDurationSeconds
)

// maxBody bounds a request body (metadata and env vars included).
const maxBody = 1 << 20

// Config configures a Server.
type Config struct {
	// API runs the lifecycle operations (its SessionHandler).
	API *api.Server
	// Store reads microVM records (state, deadlines) and sets a sandbox's
	// deadline (setTimeout, which the AWS API has no operation for).
	Store store.Store
	// Sandboxes holds keys, sandboxes, templates' tags and builds, and
	// snapshot records.
	Sandboxes store.E2BStore
	// Tokens mints envd access tokens; TrafficTokens the traffic access
	// tokens of sandboxes made with allowPublicTraffic false (nil: such
	// sandboxes are refused).
	Tokens        *EnvdTokens
	TrafficTokens *EnvdTokens
	// Domain is what sandboxes report as their domain: the endpoint
	// proxy's, with its port unless 443 ("microvm.localhost:8443"), so the
	// SDK's getHost(port) names PORT-ID.microvm.localhost:8443.
	Domain string
	// Egress is the egress connector ARN that allow_internet_access: true
	// asks for.
	Egress string
	// Ingress are the ingress connector ARNs every sandbox runs with:
	// ALL_INGRESS keeps its ports reachable, SHELL_INGRESS lets the
	// account's own `kiln exec` and `kiln cp` reach it (with a shell token
	// of the AWS API, as for any microVM: envd already gives the same
	// account's E2B key a root shell). Nil: none (ports open, no shell).
	Ingress []string
	// Meter measures running sandboxes (GET /sandboxes/{id}/metrics);
	// nil: metrics are 501.
	Meter Meter
	// Network applies sandboxes' egress rules; nil: network rules are 501.
	Network Policer
	// TemplatesDir keeps the files uploaded for template builds
	// (templates_files.go) and their build contexts; "" turns the template
	// builder off. Older kilns kept tags, builds and snapshot records in
	// it too: ImportFiles moves them into the store.
	TemplatesDir string
	// MaxUploadBytes bounds one template file upload (default
	// DefaultMaxUploadBytes); MaxAccountUploadBytes an account's kept
	// uploads (default DefaultMaxAccountUploads).
	MaxUploadBytes, MaxAccountUploadBytes int64
	// FilesMaxAge is how long garbage collection keeps template files no
	// one used (internal/gc), for the answer to an upload past the
	// account's bound; 0: GC removes none.
	FilesMaxAge time.Duration
	// References orders a use of template files against garbage
	// collection (internal/gc); nil: not ordered.
	References *gc.References
	// ArtifactDir and Operators are the API's: a template may build on a
	// kiln image whose code package is the account's upload, or on any
	// host path for an operator account.
	ArtifactDir string
	Operators   []string
	// Uploads reads the account's kiln-upload:// packages (a cluster's
	// control, where the API keeps uploads in the store); nil: none.
	Uploads source.UploadOpener
	// TemplateFiles keeps the template files in the store instead of
	// TemplatesDir/files (a cluster's control, whose replicas share no
	// data dir: the SDK's upload and the build may reach different
	// ones); nil: files. TemplatesDir still holds build contexts.
	TemplateFiles store.TemplateFiles
	// WaitTimeout bounds how long create, connect and pause wait for the
	// microVM to reach its state (default 2 minutes).
	WaitTimeout time.Duration
	Now         func() time.Time
}

// Server is the E2B control API.
type Server struct {
	cfg Config
	mux *http.ServeMux
	tpl templateState
	// uploading holds the declared size of template files being received
	// until they are stored, so that they count toward the account's bound.
	uploading inflight.Bytes
}

// New returns the E2B control API.
func New(cfg Config) *Server {
	if cfg.WaitTimeout == 0 {
		cfg.WaitTimeout = 2 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxUploadBytes == 0 {
		cfg.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if cfg.MaxAccountUploadBytes == 0 {
		cfg.MaxAccountUploadBytes = DefaultMaxAccountUploads
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux()}
	s.route("POST /sandboxes", s.create)
	s.route("POST /v2/sandboxes", s.create)
	s.route("GET /sandboxes", s.listV1)
	s.route("GET /v2/sandboxes", s.list)
	s.route("GET /sandboxes/{id}", s.get)
	s.route("DELETE /sandboxes/{id}", s.kill)
	s.route("POST /sandboxes/{id}/timeout", s.setTimeout)
	s.route("POST /sandboxes/{id}/pause", s.pause)
	s.route("POST /sandboxes/{id}/resume", s.connect)
	s.route("POST /sandboxes/{id}/connect", s.connect)
	s.route("POST /v2/sandboxes/{id}/connect", s.connect)
	s.route("GET /sandboxes/{id}/metrics", s.metrics)
	s.route("PUT /sandboxes/{id}/network", s.updateNetwork)
	s.templateRoutes()
	s.snapshotsRoutes()
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Code: http.StatusNotImplemented,
			Message: fmt.Sprintf("kiln does not implement %s %s of the E2B API yet (docs/E2B.md lists what it does)", r.Method, r.URL.Path)})
	})
	return s
}

// Prefixes are the paths of E2B's API; the server mounts them beside the
// AWS routes, with which none collides.
var Prefixes = []string{"/sandboxes", "/sandboxes/", "/v2/sandboxes", "/v2/sandboxes/", "/templates", "/templates/",
	"/v2/templates", "/v2/templates/", "/v3/templates", "/snapshots", "/snapshots/", "/volumes", "/volumes/"}

// Handler serves the E2B routes.
func (s *Server) Handler() http.Handler { return s.mux }

// apiError is E2B's Error schema; the SDK maps Code to its error classes
// (401 authentication, 404 not found, 429 rate limit, others sandbox).
type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func (e *apiError) Error() string { return e.Message }

func errorf(code int, format string, args ...any) *apiError {
	return &apiError{Code: code, Message: fmt.Sprintf(format, args...)}
}

func writeError(w http.ResponseWriter, e *apiError) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Code)
	json.NewEncoder(w).Encode(e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, errorf(500, "encoding the answer: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b)
}

// request is one authenticated call.
type request struct {
	r      *http.Request
	header http.Header     // of the answer
	key    store.AccessKey // the principal of the API's operations
	body   []byte
}

type handler func(ctx context.Context, q *request) (status int, out any, err error)

func (s *Server) route(pattern string, h handler) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		q, aerr := s.authenticate(w, r)
		if aerr != nil {
			writeError(w, aerr)
			return
		}
		q.header = w.Header()
		status, out, err := h(r.Context(), q)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) {
				slog.Error("e2b api request failed", "method", r.Method, "path", r.URL.Path, "err", err)
				ae = errorf(500, "%v", err)
			}
			writeError(w, ae)
			return
		}
		if status == http.StatusNoContent {
			w.WriteHeader(status)
			return
		}
		writeJSON(w, status, out)
	})
}

// authenticate finds the account of X-API-Key and reads the body.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (*request, *apiError) {
	key := r.Header.Get("X-API-Key")
	if key == "" {
		return nil, errorf(401, "missing X-API-Key: create a key with `kiln keys create --e2b` and set E2B_API_KEY")
	}
	if len(key) > 256 {
		return nil, errorf(401, "invalid API key")
	}
	k, err := s.cfg.Sandboxes.GetE2BKey(r.Context(), HashAPIKey(key))
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, errorf(401, "invalid API key: no such key on this kiln server")
	}
	if err != nil {
		return nil, errorf(500, "reading API key: %v", err)
	}
	if r.ContentLength > maxBody {
		return nil, errorf(413, "request body of %d bytes exceeds %d bytes", r.ContentLength, maxBody)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		return nil, errorf(400, "reading request body (at most %d bytes): %v", maxBody, err)
	}
	return &request{r: r, body: body, key: store.AccessKey{ID: "e2b:" + k.Prefix, Account: k.Account}}, nil
}

// recorder collects the answer of an in-process API operation.
type recorder struct {
	h      http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.h }
func (r *recorder) WriteHeader(s int) {
	if r.status == 0 {
		r.status = s
	}
}
func (r *recorder) Write(b []byte) (int, error) {
	r.WriteHeader(200)
	if r.body.Len()+len(b) > 4<<20 {
		return 0, errors.New("api answer too large")
	}
	return r.body.Write(b)
}

// op runs an AWS API operation as the caller, through SessionHandler.
// Its errors become E2B errors with the API's message.
func (s *Server) op(ctx context.Context, key store.AccessKey, method, path string, query url.Values, in, out any) error {
	return s.opPath(ctx, key, method, "/"+api.APIVersion+path, query, in, out)
}

// opPath is op at a full path (kiln's own routes are not under the API
// version).
func (s *Server) opPath(ctx context.Context, key store.AccessKey, method, u string, query url.Values, in, out any) error {
	var body io.Reader = http.NoBody
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	r, err := http.NewRequestWithContext(api.WithPrincipal(ctx, key), method, u, body)
	if err != nil {
		return err
	}
	r.Header.Set("Content-Type", "application/json")
	rec := &recorder{h: http.Header{}}
	s.cfg.API.SessionHandler().ServeHTTP(rec, r)
	if rec.status >= 300 {
		var e struct {
			Message string `json:"message"`
		}
		json.Unmarshal(rec.body.Bytes(), &e)
		return fromAPIError(rec.status, rec.h.Get("x-amzn-ErrorType"), e.Message)
	}
	if out != nil {
		if err := json.Unmarshal(rec.body.Bytes(), out); err != nil {
			return fmt.Errorf("decoding %s %s: %w", method, u, err)
		}
	}
	return nil
}

// fromAPIError maps an AWS API error onto E2B's codes. A quota refusal is
// 429, as E2B answers a team over its concurrent-sandbox limit.
func fromAPIError(status int, typ, msg string) *apiError {
	switch typ {
	case "ServiceQuotaExceededException", "ThrottlingException":
		return &apiError{Code: 429, Message: msg}
	case "AccessDeniedException":
		return &apiError{Code: 403, Message: msg}
	}
	return &apiError{Code: status, Message: msg}
}

// sandboxOf returns the account's E2B sandbox and its microVM; a sandbox
// that is terminating or gone is not found.
func (s *Server) sandboxOf(ctx context.Context, account, id string) (store.E2BSandbox, store.Microvm, error) {
	if !validSandboxID(id) {
		return store.E2BSandbox{}, store.Microvm{}, errorf(404, "sandbox %q not found", id)
	}
	sb, err := s.cfg.Sandboxes.GetE2BSandbox(ctx, account, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return sb, store.Microvm{}, errorf(404, "sandbox %s not found", id)
	}
	if err != nil {
		return sb, store.Microvm{}, err
	}
	m, err := s.cfg.Store.GetMicrovm(ctx, account, id)
	if errors.Is(err, errdefs.ErrNotFound) || (err == nil && gone(m.State)) {
		return sb, m, errorf(404, "sandbox %s not found (it was killed or reached its timeout)", id)
	}
	return sb, m, err
}

func gone(st store.MicrovmState) bool {
	return st == store.StateTerminating || st == store.StateTerminated
}

// validSandboxID accepts kiln's microVM ids ("mvm-" and hex digits).
func validSandboxID(id string) bool {
	rest, ok := strings.CutPrefix(id, "mvm-")
	if !ok || len(rest) == 0 || len(rest) > 64 {
		return false
	}
	for _, c := range rest {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// waitFor polls the record until its state is one of want, it is gone, or
// the wait times out.
func (s *Server) waitFor(ctx context.Context, account, id string, want ...store.MicrovmState) (store.Microvm, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WaitTimeout)
	defer cancel()
	for {
		m, err := s.cfg.Store.GetMicrovm(ctx, account, id)
		if err != nil {
			return m, err
		}
		for _, st := range want {
			if m.State == st {
				return m, nil
			}
		}
		if m.State == store.StateTerminated {
			return m, errorf(500, "sandbox %s ended: %s", id, m.StateReason)
		}
		select {
		case <-ctx.Done():
			return m, errorf(504, "sandbox %s did not become %s within %s (it is %s)", id, want[0], s.cfg.WaitTimeout, m.State)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
