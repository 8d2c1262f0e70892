// Package api serves kiln's control plane: an HTTP API wire-compatible with
// AWS Lambda MicroVMs (API version 2025-09-09, restJson1, SigV4 with
// signing name "lambda"), so that the AWS SDKs and CLI work against kiln
// with an endpoint override.
//
// The API validates a request, records it durably in the store.Store and
// answers; a Backend (the VM engine and image builder) performs the
// transition asynchronously and reports state changes back through a
// Reporter, which writes them to the same store.
package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// APIVersion is the path prefix of most operations.
const APIVersion = "2025-09-09"

// SigningName is the SigV4 service name clients sign with.
const SigningName = "lambda"

// ManagedImage is a base image that CreateMicrovmImage may build on.
type ManagedImage struct {
	Name      string
	CreatedAt time.Time
	Versions  []ManagedImageVersion
}

// ManagedImageVersion is one version of a managed base image.
type ManagedImageVersion struct {
	Version   string
	Status    string // AVAILABLE or DEPRECATED
	CreatedAt time.Time
}

// Config configures a Server. Zero values get the defaults noted.
type Config struct {
	// Region appears in ARNs and is the region clients sign for
	// (default us-east-1). Requests signed for another region are accepted.
	Region string
	// Domain is the parent of microVM endpoint host names:
	// https://<microvm-id>.<Domain>[:EndpointPort] (default microvm.localhost).
	Domain string
	// EndpointPort is appended to endpoint URLs unless empty or "443".
	EndpointPort string
	// ManagedImages lists the base images (default: one, "debian-12"
	// version "1").
	ManagedImages []ManagedImage
	// ManagedSource, when set, is asked for the managed images on every
	// call instead of ManagedImages, so versions built while the server
	// runs show up.
	ManagedSource func() []ManagedImage
	// Tokens issues endpoint auth tokens (default: an HMAC issuer with a
	// random key, valid only in this process).
	Tokens TokenIssuer
	// Architecture is what builds report (default from the host).
	Architecture string
	// Quota is every account's limits unless the operator set others for
	// it (store.QuotaOverride, `kiln quotas set`); a create beyond one is a
	// ServiceQuotaExceededException naming it (zero value: DefaultQuota;
	// a negative field: no limit).
	Quota store.Quota
	// MicrovmVCPUs is the vCPUs each microVM counts for (default 1, what
	// the image builder gives image VMs).
	MicrovmVCPUs int
	// RequestsPerSecond limits each account's request rate, with bursts of
	// twice that; beyond it requests get ThrottlingException (0: no limit).
	RequestsPerSecond float64
	// ArtifactDir receives uploaded code packages (PUT /kiln/v1/code-artifacts),
	// one folder per account; "" refuses uploads and local code packages.
	ArtifactDir string
	// Uploads, when set, receives uploaded code packages instead of
	// ArtifactDir: a cluster's control, whose replicas and nodes share
	// the store and no folder. Their URIs are kiln-upload://ACCOUNT/SHA256.zip.
	Uploads store.Uploads
	// MaxArtifactBytes bounds an uploaded package (default 1 GiB).
	MaxArtifactBytes int64
	// OperatorAccounts may build from any local path or file:// URI;
	// other accounts only from their own uploads or remote URIs.
	OperatorAccounts []string
	// MaxBodyBytes bounds request bodies (default 6 MiB).
	MaxBodyBytes int64
	// Accel is the accelerator the VMs run under ("kvm", "tcg"; "" when
	// no VMs run), for GET /kiln/v1/info.
	Accel string
	// DefaultInternetEgress gives a microVM whose run and image name no
	// egress connector the INTERNET_EGRESS connector, as AWS does (AWS's
	// default is public internet). kiln's default is off: no egress unless
	// asked for (`kiln server --default-egress`).
	DefaultInternetEgress bool
	// References orders the records that reference files (image versions,
	// uploads) against garbage collection (internal/gc.References); nil:
	// no garbage collector runs.
	References interface{ Hold() (release func()) }
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// holdReferences is References.Hold, or nothing.
func (s *Server) holdReferences() func() {
	if s.cfg.References == nil {
		return func() {}
	}
	return s.cfg.References.Hold()
}

// Server is the API. Create it with NewServer; serve Handler(); call Start
// once to recover unfinished work and run the deadline controller.
type Server struct {
	cfg      Config
	st       store.Store
	be       lifecycle.Backend
	lc       *lifecycle.Service
	rep      *lifecycle.Reporter
	verifier *auth.Verifier
	mux      *http.ServeMux
	// sessionMux serves the same operations to callers another adapter
	// authenticated (the web console's sessions): see SessionHandler.
	sessionMux *http.ServeMux
	limits     *limiter
	// uploading holds the declared size of the uploads being received
	// until they are stored, so that they count toward the storage quota.
	uploading inflight.Bytes
}

// NewServer returns an API server over st that hands accepted work to be.
func NewServer(cfg Config, st store.Store, be lifecycle.Backend) *Server {
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.Domain == "" {
		cfg.Domain = "microvm.localhost"
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 6 << 20
	}
	if cfg.Quota == (store.Quota{}) {
		cfg.Quota = DefaultQuota
	}
	if cfg.MicrovmVCPUs <= 0 {
		cfg.MicrovmVCPUs = 1
	}
	if cfg.MaxArtifactBytes == 0 {
		cfg.MaxArtifactBytes = 1 << 30
	}
	if cfg.Architecture == "" {
		cfg.Architecture = map[string]string{"amd64": "X86_64", "arm64": "ARM_64"}[runtime.GOARCH]
	}
	if len(cfg.ManagedImages) == 0 {
		t := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		cfg.ManagedImages = []ManagedImage{{Name: "debian-12", CreatedAt: t,
			Versions: []ManagedImageVersion{{Version: "1", Status: "AVAILABLE", CreatedAt: t}}}}
	}
	if cfg.Tokens == nil {
		cfg.Tokens = NewHMACIssuer(nil)
	}
	lc := lifecycle.New(st, be, cfg.Now)
	s := &Server{cfg: cfg, st: st, be: be, lc: lc, rep: lc.Reporter(), verifier: auth.NewVerifier(st, SigningName)}
	if cfg.RequestsPerSecond > 0 {
		s.limits = newLimiter(cfg.RequestsPerSecond, 2*cfg.RequestsPerSecond, cfg.Now)
	}
	s.verifier.Now = cfg.Now
	s.routes()
	return s
}

// Verifier returns the SigV4 verifier (to drop a deleted key from its cache).
func (s *Server) Verifier() *auth.Verifier { return s.verifier }

// Reporter returns the Reporter writing to this server's store.
func (s *Server) Reporter() *lifecycle.Reporter { return s.rep }

// Lifecycle returns the life cycle the API drives microVMs through.
func (s *Server) Lifecycle() *lifecycle.Service { return s.lc }

// Handler returns the HTTP handler of the API.
func (s *Server) Handler() http.Handler { return s.mux }

// Start hands unfinished work to the backend and then runs the deadline
// controller until ctx ends (lifecycle.Service.Start). It returns after
// recovery; the controller keeps running.
func (s *Server) Start(ctx context.Context) error {
	s.lc.Start(ctx)
	return nil
}

// SmallBody is the largest request body read before it is authenticated.
// A larger body (or one of unknown length) must be signed with its hash in
// X-Amz-Content-Sha256, so that the signature is checked from the headers
// alone and an unauthenticated client cannot make the server read
// megabytes; its bytes are then checked against that hash.
const SmallBody = 64 << 10

// call is one authenticated request.
type call struct {
	r       *http.Request
	body    []byte
	account string
	key     store.AccessKey
}

func (c *call) path(name string) string { return c.r.PathValue(name) }

type handler func(ctx context.Context, c *call) (any, error)

func (s *Server) handle(pattern string, status int, h handler) {
	s.mux.HandleFunc(pattern, s.operation(status, h, s.authenticate))
	s.sessionMux.HandleFunc(pattern, s.operation(status, h, s.sessionPrincipal))
}

// handleOp serves AWS operation op: its input is validated against the
// model's constraints (rules) before h runs, so before any lookup.
func (s *Server) handleOp(op, pattern string, status int, h handler) {
	if _, ok := rules[op]; !ok {
		panic("api: no validation rules for operation " + op)
	}
	w := wireOf(op, pattern)
	checked := func(ctx context.Context, c *call) (any, error) {
		in, err := input(w, c.r.PathValue, c.r.URL.Query(), c.body)
		if err != nil {
			return nil, err
		}
		if verr := validateOp(op, in); verr != nil {
			return nil, verr
		}
		return h(ctx, c)
	}
	s.handle(pattern, status, checked)
}

// operation runs h for the principal that authn finds, with the rate limit
// and the answer's encoding every operation shares.
func (s *Server) operation(status int, h handler, authn func(http.ResponseWriter, *http.Request) ([]byte, store.AccessKey, *Error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		// SDKs report this id with every answer, errors included.
		w.Header().Set("x-amzn-RequestId", newRequestID())
		body, key, aerr := authn(w, r)
		if aerr != nil {
			writeError(w, r, aerr)
			return
		}
		if s.limits != nil && !s.limits.allow(key.Account) {
			writeError(w, r, &Error{Status: 429, Type: "ThrottlingException", Message: "rate of requests exceeded for this account", RetryAfter: 1})
			return
		}
		out, err := h(r.Context(), &call{r: r, body: body, account: key.Account, key: key})
		if err != nil {
			writeError(w, r, toAPIError(err, "", ""))
			return
		}
		if status == http.StatusNoContent {
			w.WriteHeader(status)
			return
		}
		b, err := json.Marshal(out)
		if err != nil {
			writeError(w, r, internal("encoding response: "+err.Error()))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(status)
		w.Write(b)
	}
}

// authenticate checks r's signature and reads its body, in the order that
// keeps an unauthenticated client from making the server read much: bodies
// up to SmallBody are read and then verified; larger ones (and those of
// unknown length) are verified from the headers, with the hash the client
// signed in X-Amz-Content-Sha256, before a byte is read, and then must
// match that hash.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) ([]byte, store.AccessKey, *Error) {
	denied := func(err error) *Error {
		if errors.Is(err, auth.ErrDenied) {
			return accessDenied(err.Error())
		}
		return internal(err.Error())
	}
	if r.ContentLength > s.cfg.MaxBodyBytes {
		return nil, store.AccessKey{}, &Error{Status: 413, Type: "RequestTooLargeException",
			Message: fmt.Sprintf("request body of %d bytes exceeds %d bytes", r.ContentLength, s.cfg.MaxBodyBytes)}
	}
	declared := r.Header.Get("X-Amz-Content-Sha256")
	if !sha256RE.MatchString(declared) {
		if r.ContentLength < 0 || r.ContentLength > SmallBody {
			return nil, store.AccessKey{}, &Error{Status: 413, Type: "RequestTooLargeException",
				Message: fmt.Sprintf("a request body over %d bytes (or of unknown length) must declare its Content-Length and sign its lower-case hex SHA-256 in X-Amz-Content-Sha256", SmallBody)}
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, SmallBody))
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				return nil, store.AccessKey{}, validation("request body exceeds its Content-Length")
			}
			return nil, store.AccessKey{}, validation("reading request body: %v", err)
		}
		key, err := s.verifier.Verify(r, body)
		if err != nil {
			return nil, key, denied(err)
		}
		return body, key, nil
	}
	key, err := s.verifier.VerifyHash(r, declared, r.ContentLength)
	if err != nil {
		return nil, key, denied(err)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, key, validation("request body exceeds %d bytes", s.cfg.MaxBodyBytes)
		}
		return nil, key, validation("reading request body: %v", err)
	}
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != declared {
		return nil, key, validation("the body does not match its X-Amz-Content-Sha256")
	}
	return body, key, nil
}

func (s *Server) routes() {
	s.mux = http.NewServeMux()
	s.sessionMux = http.NewServeMux()
	v := "/" + APIVersion
	s.handleOp("CreateMicrovmImage", "POST "+v+"/microvm-images", 201, s.createImage)
	s.handleOp("ListMicrovmImages", "GET "+v+"/microvm-images", 200, s.listImages)
	s.handleOp("GetMicrovmImage", "GET "+v+"/microvm-images/{imageIdentifier}", 200, s.getImage)
	s.handleOp("UpdateMicrovmImage", "PUT "+v+"/microvm-images/{imageIdentifier}", 200, s.updateImage)
	s.handleOp("DeleteMicrovmImage", "DELETE "+v+"/microvm-images/{imageIdentifier}", 200, s.deleteImage)
	s.handleOp("ListMicrovmImageVersions", "GET "+v+"/microvm-images/{imageIdentifier}/versions", 200, s.listImageVersions)
	s.handleOp("GetMicrovmImageVersion", "GET "+v+"/microvm-images/{imageIdentifier}/versions/{imageVersion}", 200, s.getImageVersion)
	s.handleOp("UpdateMicrovmImageVersion", "PATCH "+v+"/microvm-images/{imageIdentifier}/versions/{imageVersion}", 200, s.updateImageVersion)
	s.handleOp("DeleteMicrovmImageVersion", "DELETE "+v+"/microvm-images/{imageIdentifier}/versions/{imageVersion}", 200, s.deleteImageVersion)
	s.handleOp("ListMicrovmImageBuilds", "GET "+v+"/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds", 200, s.listBuilds)
	s.handleOp("GetMicrovmImageBuild", "GET "+v+"/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}", 200, s.getBuild)
	s.handleOp("ListManagedMicrovmImages", "GET "+v+"/managed-microvm-images", 200, s.listManagedImages)
	s.handleOp("ListManagedMicrovmImageVersions", "GET "+v+"/managed-microvm-images/{imageIdentifier}/versions", 200, s.listManagedImageVersions)
	s.handleOp("RunMicrovm", "POST "+v+"/microvms", 200, s.runMicrovm)
	s.handleOp("ListMicrovms", "GET "+v+"/microvms", 200, s.listMicrovms)
	s.handleOp("GetMicrovm", "GET "+v+"/microvms/{microvmIdentifier}", 200, s.getMicrovm)
	s.handleOp("TerminateMicrovm", "DELETE "+v+"/microvms/{microvmIdentifier}", 200, s.terminateMicrovm)
	s.handleOp("SuspendMicrovm", "POST "+v+"/microvms/{microvmIdentifier}/suspend", 200, s.suspendMicrovm)
	s.handleOp("ResumeMicrovm", "POST "+v+"/microvms/{microvmIdentifier}/resume", 200, s.resumeMicrovm)
	s.handleOp("CreateMicrovmAuthToken", "POST "+v+"/microvms/{microvmIdentifier}/auth-token", 200, s.createAuthToken)
	s.handleOp("CreateMicrovmShellAuthToken", "POST "+v+"/microvms/{microvmIdentifier}/shell-auth-token", 200, s.createShellAuthToken)
	s.handleOp("ListTags", "GET /2017-03-31/tags/{Resource}", 200, s.listTags)
	s.handleOp("TagResource", "POST /2017-03-31/tags/{Resource}", 204, s.tagResource)
	s.handleOp("UntagResource", "DELETE /2017-03-31/tags/{Resource}", 204, s.untagResource)
	// Build logs are a kiln extension (no AWS operation exposes them); the
	// path is outside the AWS API's version prefixes.
	s.handle("GET /kiln/v1/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}/log", 200, s.getBuildLog)
	s.handle("GET /kiln/v1/microvms/{microvmIdentifier}/log", 200, s.getMicrovmLog)
	s.handle("GET /kiln/v1/quota", 200, s.getQuota)
	s.handle("GET /kiln/v1/microvms/{microvmIdentifier}/events", 200, s.getMicrovmEvents)
	s.handle("GET /kiln/v1/microvm-images/{imageIdentifier}/events", 200, s.getImageEvents)
	s.handle("GET "+UsagePath, 200, s.getUsage)
	s.mux.HandleFunc("PUT "+ArtifactPath, s.uploadArtifact)
	s.sessionMux.HandleFunc("PUT "+ArtifactPath, s.uploadArtifactSession)
	s.mux.HandleFunc("GET "+InfoPath, s.info)
	s.sessionMux.HandleFunc("GET "+InfoPath, s.info)
	unknown := func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, &Error{Status: 404, Type: "UnknownOperationException", Message: fmt.Sprintf("no operation at %s %s", r.Method, r.URL.Path)})
	}
	s.mux.HandleFunc("/", unknown)
	s.sessionMux.HandleFunc("/", unknown)
}

// InfoPath answers, without authentication, what isolation this server
// gives: {"accel": "tcg", "isolation": "not a security boundary"}. It is
// open so that health checks and load balancers, which cannot sign, can
// use it; it tells nothing about any account, and what it tells (the
// accelerator) every tenant can measure from inside its VM anyway.
const InfoPath = "/kiln/v1/info"

// Isolation says what separates a tenant's code from the host under
// accel: KVM's hardware virtualisation, or, under TCG, nothing that QEMU's
// security policy covers.
func Isolation(accel string) string {
	switch accel {
	case "kvm":
		return "kvm"
	case "tcg":
		return "not a security boundary"
	case "", "none":
		return "no microVMs run (fake backend)"
	}
	return "unknown accelerator: not a security boundary"
}

func (s *Server) info(w http.ResponseWriter, r *http.Request) {
	accel := s.cfg.Accel
	if accel == "" {
		accel = "none"
	}
	b, _ := json.Marshal(map[string]string{"accel": accel, "isolation": Isolation(s.cfg.Accel), "apiVersion": APIVersion})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Write(b)
}

// decode parses a JSON request body into v; an empty body is {}.
func decode(c *call, v any) error {
	if len(c.body) == 0 {
		return nil
	}
	if err := json.Unmarshal(c.body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return fieldError(te.Field, nil, "Member must be of type "+jsonKind(te.Type.Kind().String()))
		}
		return validation("request body is not valid JSON: %v", err)
	}
	return nil
}

func jsonKind(k string) string {
	switch k {
	case "string":
		return "string"
	case "bool":
		return "boolean"
	case "slice":
		return "list"
	case "map", "struct", "ptr":
		return "structure"
	default:
		return "number"
	}
}

// pageOf reads maxResults and nextToken from the query string.
func pageOf(c *call, max int) (store.Page, error) {
	q := c.r.URL.Query()
	p := store.Page{Limit: max, Token: q.Get("nextToken")}
	if m := q.Get("maxResults"); m != "" {
		n, err := strconv.Atoi(m)
		if err != nil {
			return p, fieldError("maxResults", m, "Member must be an integer")
		}
		if n < 1 || n > max {
			return p, fieldError("maxResults", n, fmt.Sprintf("Member must have value between 1 and %d", max))
		}
		p.Limit = n
	}
	if len(p.Token) > 1024 {
		return p, fieldError("nextToken", nil, "Member must have length less than or equal to 1024")
	}
	return p, nil
}

// epoch is a timestamp in restJson1's default format: seconds since the
// epoch, with a fraction.
type epoch time.Time

func (t epoch) MarshalJSON() ([]byte, error) {
	return []byte(strconv.FormatFloat(float64(time.Time(t).UnixMilli())/1000, 'f', -1, 64)), nil
}

func ts(t time.Time) *epoch {
	if t.IsZero() {
		return nil
	}
	e := epoch(t)
	return &e
}

func tsp(t *time.Time) *epoch {
	if t == nil {
		return nil
	}
	return ts(*t)
}

// limiter is a token bucket per account.
type limiter struct {
	mu      sync.Mutex
	rate    float64
	burst   float64
	now     func() time.Time
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate, burst float64, now func() time.Time) *limiter {
	return &limiter{rate: rate, burst: burst, now: now, buckets: map[string]*bucket{}}
}

func (l *limiter) allow(account string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b, ok := l.buckets[account]
	if !ok {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[account] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
