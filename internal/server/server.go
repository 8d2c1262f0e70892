// Package server assembles a whole kiln server — state store, VM engine
// or cluster backend, life cycle, API, console, E2B API, endpoint proxy,
// garbage collection, metrics — from Options. `kiln server`, `kiln
// control` and `kiln node` only parse flags and call Run; tests and
// benchmarks call New to get the same server with handles on its parts.
package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/connlimit"
	"github.com/kiln-sandbox/kiln/internal/console"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/token"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Options are what a kiln server is assembled from: the flags of `kiln
// server`, `kiln control` and `kiln node`, and for tests and benchmarks a
// driver of their own and engine settings.
type Options struct {
	// Backend runs the microVMs: "engine" (the VM engine, Linux only) or
	// "fake" (records only). Role "control" ignores it.
	Backend string
	// Log is the server's logger (nil: slog.Default()).
	Log *slog.Logger `json:"-"`
	// Accel is --accel: auto, kvm or tcg ("": auto).
	Accel string
	// EndpointCert and EndpointKey (--endpoint-cert, --endpoint-key) serve
	// the endpoints with the operator's certificate instead of kiln's CA.
	EndpointCert, EndpointKey string
	// Store and SealingKey are --store and --sealing-key (see OpenStore).
	Store, SealingKey string
	// Driver, if set, runs the engine's VMs instead of a QEMU driver the
	// server starts on DataDir; the caller owns it (the server neither
	// closes it nor restores host network settings), and no image builder
	// is made unless it is a *qemu.Driver. Tests and benchmarks share one
	// driver and its templates across servers this way; recovery and
	// garbage collection then judge only the VMs this server's DataDir
	// made (engine.Config.SharedDriver).
	Driver vmm.Driver `json:"-"`
	// EngineConfig, if set, adjusts the engine's configuration before it
	// starts (tests and benchmarks: a shorter idle interval, a builder).
	EngineConfig func(*engine.Config) `json:"-"`
	// Stopping counts the shut-down work a backend runs after ctx ends
	// (closing the VM driver kills the processes started ahead for
	// clones); Serve waits for it before returning.
	Stopping     *sync.WaitGroup `json:"-"`
	DataDir      string
	APIAddr      string
	EndpointAddr string
	Domain       string
	Region       string
	// Quota is every account's limits unless `kiln quotas set` gave it
	// others (--quota-*; negative: no limit).
	Quota             store.Quota
	RequestsPerSecond float64
	// Host admission and builds (internal/engine): MemoryOvercommit is the
	// guest memory the host may commit, as a ratio of its physical memory;
	// MaxConcurrentBuilds builds run at once, others queue; BuildTimeout
	// bounds a whole build; BuildLogMaxBytes caps each build's log.
	MemoryOvercommit    float64
	MaxConcurrentBuilds int
	BuildTimeout        time.Duration
	BuildLogMaxBytes    int64
	// ClonePool is how many QEMU processes per template are started ahead
	// of clones (0: none).
	ClonePool int
	// Network policy for tenants (internal/egress). DenyCIDRs
	// (--deny-cidr) are denied to app VMs, build VMs and kiln's fetches
	// for tenants on top of the built-in list; AllowFetchCIDRs
	// (--allow-fetch-cidr) exempt prefixes for kiln's fetches only (an
	// internal mirror); InsecureRegistries (--insecure-registry
	// HOST:PORT) are the only registries pulled over plain HTTP or from a
	// denied address such as loopback.
	DenyCIDRs          []netip.Prefix
	AllowFetchCIDRs    []netip.Prefix
	InsecureRegistries []string
	// AptMirrors (--apt-mirror URI) are Debian mirrors whose plain-HTTP
	// traffic from build VMs goes through kiln's package proxy, besides
	// the http:// mirrors of the host's own apt sources.
	AptMirrors []string
	// OperatorAccount may build from host paths (default: the account
	// recorded when the first admin key was made).
	OperatorAccount string
	// APICert and APIKey serve the API over TLS (PEM files; both or none).
	APICert, APIKey string
	// MaxConnsPerClient caps concurrent API connections per client
	// address (0: no cap).
	MaxConnsPerClient int
	// RequireKVM refuses to start unless VMs run under KVM.
	RequireKVM bool
	// MetricsAddr serves /metrics, /healthz and /readyz ("": off).
	MetricsAddr string
	// GCInterval is how often garbage collection runs (at start too; 0:
	// never); TerminatedRetention how long TERMINATED microVM records and
	// client tokens are kept; CacheMaxAge how long an unused build cache
	// entry is kept.
	GCInterval          time.Duration
	TerminatedRetention time.Duration
	CacheMaxAge         time.Duration
	// TemplateFilesMaxAge is how long E2B template files no build or
	// files check used are kept (0: gc's default);
	// TemplateFilesMaxAccountBytes bounds an account's kept template
	// files (0: e2b's default).
	TemplateFilesMaxAge          time.Duration
	TemplateFilesMaxAccountBytes int64
	// Health collects readiness checks for /readyz; New makes it and
	// the backend adds its own (the VM engine, the endpoint proxy).
	Health *metrics.Health `json:"-"`
	// References orders image and artifact references the API records
	// against garbage collection (internal/gc); New makes it.
	References *gc.References `json:"-"`
	// LogMaxBytes caps each microVM's kept output; LogRetention is how
	// long it stays after the VM ended (0: applog's defaults).
	LogMaxBytes  int64
	LogRetention time.Duration
	// S3 store of s3:// code artifacts: --s3-endpoint ("" = AWS's own S3),
	// --s3-region ("" = the AWS chain's region, then --region) and
	// --s3-path-style; credentials come from the standard AWS chain.
	S3Endpoint  string
	S3Region    string
	S3PathStyle bool
	// DefaultEgress (--default-egress) is the egress of microVMs and builds
	// whose run and image name no egress connector: "none" (kiln's
	// default) or "internet" (AWS's).
	DefaultEgress string
	// Role is the cluster role this process runs ("" = all of kiln in
	// one process, `kiln server`): "control" serves the API and the life
	// cycle over nodes, "node" runs this host's VMs for control (see
	// cluster.go).
	Role string
	// Cluster is the cluster's identity and node settings (cluster.go).
	Cluster ClusterOptions
	// NetPool (--net-pool) is where VM links' addresses come from;
	// VMUIDBase (--vm-uid-base) where VM processes' uids come from (zero:
	// the defaults). Hosts that share a kernel's users or links, such as
	// a cluster's nodes standing in for hosts on one machine, set their own.
	NetPool   string
	VMUIDBase uint32
	// CgroupRoot (--cgroup-root) is where the host's cgroup file system
	// is mounted, and HostCgroupNS (--host-cgroupns) the host's cgroup
	// namespace, entered to place each QEMU's cgroup outside a Pod's
	// namespace (internal/jail, cgroupns.go); "": the defaults.
	CgroupRoot   string
	HostCgroupNS string
	// TokenKey (--token-key of `kiln control`) is the operator's file of
	// the endpoint token key ("": DATA_DIR/token.key).
	TokenKey string
	// RolesFile (--roles-file) maps execution role ARNs to credential
	// sources (internal/imds); "" = no VM gets credentials.
	RolesFile string
}

// DefaultInternetEgress reports whether --default-egress is internet.
func (o Options) DefaultInternetEgress() bool { return o.DefaultEgress == "internet" }

// FetchPolicy is the egress policy of kiln's fetches for tenants.
func (o Options) FetchPolicy() *egress.Policy {
	return &egress.Policy{ExtraDeny: o.DenyCIDRs, Allow: o.AllowFetchCIDRs}
}

func (o Options) logger() *slog.Logger {
	if o.Log != nil {
		return o.Log
	}
	return slog.Default()
}

// SettingQuotaDefaults records the --quota-* limits of the last server
// start, so that `kiln quotas get` shows what applies.
const SettingQuotaDefaults = "quota_defaults"

// backend is what a backend factory assembled: the lifecycle.Backend the
// API hands accepted work to and, optionally, the endpoint side.
type backend struct {
	lifecycle.Backend
	// Tokens issues the endpoint proxy's tokens (nil: the API's HMAC
	// issuer); Signer is the key behind them, if the backend has one.
	Tokens api.TokenIssuer
	Signer *token.Signer
	// Engine is the VM engine, for the "engine" backend.
	Engine *engine.Engine
	// EndpointAddr is where the endpoint proxy listens ("": none here).
	EndpointAddr string
}

// backendFactory builds the backend behind the API from the store and the
// Reporter through which it reports state changes. ctx lives as long as
// the server.
type backendFactory func(ctx context.Context, o Options, st store.Store, rep *lifecycle.Reporter) (backend, error)

// engineBackend is the VM engine's factory, set where it is linked in
// (engine_linux.go); runNode likewise runs `kiln node`.
var (
	engineBackend backendFactory
	runNode       func(ctx context.Context, o Options, st store.Store) error
)

func fakeBackend(ctx context.Context, o Options, st store.Store, rep *lifecycle.Reporter) (backend, error) {
	o.logger().Warn("using the fake backend: no VMs run, records only move through their states")
	return backend{Backend: fakebackend.New(rep, 200*time.Millisecond)}, nil
}

// cachePruners returns the build caches' pruners (set on Linux, where the
// image builder is).
var cachePruners func(dataDir string) (image, template func(maxAge time.Duration) (int, error))

// Server is an assembled kiln server whose listeners are open; Serve runs
// it. Its fields are the parts tests and benchmarks drive directly.
type Server struct {
	Store   store.Store
	API     *api.Server
	Backend lifecycle.Backend
	// Engine is the VM engine (nil for the fake and control backends).
	Engine *engine.Engine
	// EndpointSigner signs endpoint tokens (nil for the fake backend);
	// EndpointAddr is the endpoint proxy's address ("": none here).
	EndpointSigner *token.Signer
	EndpointAddr   string
	// APIURL is where the API, the console and the E2B API serve
	// (http://ADDR or https://ADDR).
	APIURL string
	// Accel is the VM engine's accelerator ("" without one); Note what
	// the start-up line says about isolation.
	Accel, Note string

	ln      net.Listener
	hs      *http.Server
	release func()
}

// Run assembles the server o describes and serves until ctx ends: the
// whole of `kiln server`, `kiln control` and `kiln node`.
func Run(ctx context.Context, o Options) error {
	if o.Role == "node" {
		return serveNode(ctx, o)
	}
	s, err := New(ctx, o)
	if err != nil {
		return err
	}
	fmt.Printf("kiln API serving at %s (%s)\n", s.APIURL, s.Note)
	fmt.Printf("kiln console at %s%s (sign in with an access key from the credentials file)\n", s.APIURL, console.Prefix)
	return s.Serve(ctx)
}

// check refuses options that contradict each other, before anything starts.
func (o *Options) check() error {
	if o.Backend == "" {
		o.Backend = "engine"
	}
	if o.Role != "control" && o.Backend != "engine" && o.Backend != "fake" {
		return fmt.Errorf("unknown backend %q", o.Backend)
	}
	if o.Role != "control" && o.Backend == "engine" && engineBackend == nil {
		return fmt.Errorf("this kiln build has no VM engine linked in; use --backend fake to try the API")
	}
	if (o.APICert == "") != (o.APIKey == "") {
		return fmt.Errorf("--api-cert and --api-key go together: give both to serve HTTPS, or neither")
	}
	if o.OperatorAccount != "" && !ValidAccount(o.OperatorAccount) {
		return fmt.Errorf("--operator-account must be a 12-digit account id, not %q", o.OperatorAccount)
	}
	if o.TemplateFilesMaxAge < 0 || o.TemplateFilesMaxAccountBytes < 0 {
		return fmt.Errorf("--template-files-max-age and --template-files-max-account-bytes must be positive (0: the defaults, 7 days and 4 GiB)")
	}
	if o.RequireKVM && o.Backend != "engine" {
		return fmt.Errorf("--require-kvm: the %s backend runs no VMs under KVM", o.Backend)
	}
	return nil
}

// open opens the store and starts what every role serves: health checks
// and, with MetricsAddr, /metrics. release undoes it once the backend's
// shut-down work is done.
func open(ctx context.Context, o *Options) (st store.Store, release func(), err error) {
	st, err = OpenStore(ctx, StoreOptions{DataDir: o.DataDir, Store: o.Store, SealingKey: o.SealingKey})
	if err != nil {
		return nil, nil, err
	}
	if o.Stopping == nil {
		o.Stopping = new(sync.WaitGroup)
	}
	stopping := o.Stopping
	release = func() {
		waitStopping(stopping, 30*time.Second)
		st.Close()
	}
	o.Health = metrics.NewHealth()
	o.References = &gc.References{}
	metrics.SetStateCounter(func(ctx context.Context) (map[string]int, error) {
		n, err := st.CountMicrovmsByState(ctx)
		out := make(map[string]int, len(n))
		for k, v := range n {
			out[string(k)] = v
		}
		return out, err
	})
	o.Health.Set("store", func(ctx context.Context) error {
		if _, err := st.GetSetting(ctx, store.SettingOperatorAccount); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("the state store does not answer: %w", err)
		}
		return nil
	})
	if o.MetricsAddr != "" {
		mln, err := net.Listen("tcp", o.MetricsAddr)
		if err != nil {
			release()
			return nil, nil, fmt.Errorf("--metrics-addr %s: %w", o.MetricsAddr, err)
		}
		go func() {
			if err := metrics.Serve(ctx, mln, o.Health); err != nil {
				slog.Error("metrics endpoint stopped", "err", err)
			}
		}()
		slog.Info("metrics and health serving", "addr", mln.Addr().String(), "paths", "/metrics /healthz /readyz")
	}
	return st, release, nil
}

// serveNode is Run for role "node": this host's engine for a cluster.
func serveNode(ctx context.Context, o Options) error {
	if err := o.check(); err != nil {
		return err
	}
	if runNode == nil {
		return fmt.Errorf("this kiln build has no VM engine linked in")
	}
	st, release, err := open(ctx, &o)
	if err != nil {
		return err
	}
	defer release()
	return runNode(ctx, o, st)
}

// New assembles the server o describes (any role but "node") and opens
// its listeners; the backend runs until ctx ends. Serve serves the API.
// On error everything New started has stopped once ctx ends.
func New(ctx context.Context, o Options) (s *Server, err error) {
	if o.Role == "node" {
		return nil, fmt.Errorf("role node serves no API: use Run")
	}
	if err := o.check(); err != nil {
		return nil, err
	}
	st, closeStore, err := open(ctx, &o)
	if err != nil {
		return nil, err
	}
	// What the backend started stops with ctx, or at once when New fails:
	// waiting for its shut-down work must not wait for the caller's ctx.
	ctx, cancel := context.WithCancel(ctx)
	release := func() { cancel(); closeStore() }
	defer func() {
		if err != nil {
			release()
		}
	}()
	factory := fakeBackend
	switch {
	case o.Role == "control":
		factory = controlBackend
	case o.Backend == "engine":
		factory = engineBackend
	}
	if err := ensureAdminKey(ctx, st, filepath.Join(o.DataDir, "credentials")); err != nil {
		return nil, err
	}
	if o.Quota == (store.Quota{}) {
		o.Quota = api.DefaultQuota
	}
	// `kiln quotas get` shows the limits this server applies.
	if err := st.SetSetting(ctx, SettingQuotaDefaults, string(mustJSON(o.Quota))); err != nil {
		return nil, err
	}
	operator, err := operatorAccount(ctx, st, o.OperatorAccount)
	if err != nil {
		return nil, err
	}
	var operators []string
	if operator != "" {
		operators = []string{operator}
	}
	var tlsConf *tls.Config
	if o.APICert != "" {
		cert, err := tls.LoadX509KeyPair(o.APICert, o.APIKey)
		if err != nil {
			return nil, fmt.Errorf("loading --api-cert and --api-key: %w", err)
		}
		warnIfReadable(o.APIKey)
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	rep := lifecycle.NewReporter(st)
	be, err := factory(ctx, o, st, rep)
	if err != nil {
		return nil, fmt.Errorf("starting backend: %w", err)
	}
	accel := ""
	if a, ok := be.Backend.(interface{ Accel() string }); ok {
		accel = a.Accel()
	}
	if o.RequireKVM && accel != "kvm" {
		return nil, requireKVMError(accel, "reported by the VM engine")
	}
	if accel == "tcg" {
		slog.Warn("microVMs run under TCG: NOT a security boundary; run untrusted tenants only on a KVM host (--require-kvm enforces it)")
	}
	// Secret files the backend made (TLS and token keys) are 0600 on
	// creation; check once more, now that they exist.
	if err := SecureDataDir(o.DataDir); err != nil {
		return nil, err
	}
	_, port, _ := net.SplitHostPort(o.EndpointAddr)
	uploads, artifactDir, err := clusterUploads(o, st)
	if err != nil {
		return nil, err
	}
	srv := api.NewServer(api.Config{Region: o.Region, Domain: o.Domain, EndpointPort: port, Tokens: be.Tokens,
		Quota: o.Quota, RequestsPerSecond: o.RequestsPerSecond,
		ArtifactDir: artifactDir, Uploads: uploads, OperatorAccounts: operators,
		ManagedSource: managedImages(o.DataDir), Accel: accel, References: o.References,
		DefaultInternetEgress: o.DefaultInternetEgress()}, st, be.Backend)
	ln, err := net.Listen("tcp", o.APIAddr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", o.APIAddr, err)
	}
	ln = connlimit.New(ln, o.MaxConnsPerClient)
	scheme := "http"
	if tlsConf != nil {
		ln, scheme = tls.NewListener(ln, tlsConf), "https"
	}
	if o.Role == "control" {
		if err := startControlLoops(ctx, o, st, srv, be.Backend); err != nil {
			ln.Close()
			return nil, err
		}
	}
	if err := srv.Start(ctx); err != nil {
		ln.Close()
		return nil, err
	}
	if o.GCInterval > 0 {
		// After Start: recovery has claimed what it keeps before the first
		// pass judges orphans.
		cfg := gc.Config{Store: st, DataDir: o.DataDir, References: o.References,
			TerminatedRetention: o.TerminatedRetention, CacheMaxAge: o.CacheMaxAge,
			TemplateFilesDir: e2b.FilesDir(e2bTemplatesDir(o)), TemplateFilesMaxAge: o.TemplateFilesMaxAge}
		if e, ok := be.Backend.(gc.Engine); ok {
			cfg.Engine = e
		}
		if cachePruners != nil {
			cfg.PruneImageCache, cfg.PruneTemplateCache = cachePruners(o.DataDir)
		}
		go gc.New(cfg).Loop(ctx, o.GCInterval)
	}
	web := console.New(console.Config{API: srv, Store: st, Operators: operators, TLS: tlsConf != nil,
		Domain: o.Domain, EndpointPort: port, HostMemoryMiB: hostMemoryMiB()})
	top := http.NewServeMux()
	top.Handle(console.Prefix, web.Handler())
	top.Handle("/", srv.Handler())
	if err := mountE2B(ctx, top, o, st, srv, be.Backend, port, operators); err != nil {
		ln.Close()
		return nil, err
	}
	note := isolationNote(o.Backend, accel)
	if o.Role == "control" {
		note = "cluster control: microVMs run on the nodes"
	}
	return &Server{Store: st, API: srv, Backend: be.Backend, Engine: be.Engine, EndpointSigner: be.Signer, EndpointAddr: be.EndpointAddr,
		APIURL: scheme + "://" + ln.Addr().String(), Accel: accel, Note: note,
		ln: ln, hs: newHTTPServer(connlimit.Handler(top)), release: release}, nil
}

// clusterUploads is where uploads are kept. A cluster's control keeps
// them in the store, which its replicas and the nodes share (its data dir
// is its own, an emptyDir on Kubernetes), and has no upload folder, so no
// file:// URI is a tenant's upload there. One host (`kiln server`) keeps
// them in DATA_DIR/artifacts as before.
func clusterUploads(o Options, st store.Store) (up store.Uploads, artifactDir string, err error) {
	if o.Role != "control" {
		return nil, filepath.Join(o.DataDir, "artifacts"), nil
	}
	up, ok := st.(store.Uploads)
	if !ok {
		return nil, "", fmt.Errorf("cluster control needs a store that keeps uploads (PostgreSQL); %T does not", st)
	}
	return up, "", nil
}

// Serve serves the API, the console and the E2B API until ctx ends (the
// ctx New was given, or one that ends no later), then shuts down, waits
// for the backend's shut-down work and closes the store.
func (s *Server) Serve(ctx context.Context) error {
	defer s.release()
	errc := make(chan error, 1)
	go func() { errc <- s.hs.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving API: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := s.hs.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutting down API: %w", err)
	}
	return nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// waitStopping waits up to limit for the backend's shut-down work: the
// process must not exit while the driver is still killing what it owns.
func waitStopping(wg *sync.WaitGroup, limit time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
		slog.Warn("shut-down work did not finish; exiting anyway", "waited", limit)
	}
}

// API transport limits. Requests are small JSON documents; the upload
// handler extends its own deadlines for large packages, and a handler that
// streams for long must clear its deadlines with http.ResponseController.
const (
	apiReadHeaderTimeout = 10 * time.Second
	apiReadTimeout       = time.Minute
	apiWriteTimeout      = 2 * time.Minute
	apiIdleTimeout       = 2 * time.Minute
	apiMaxHeaderBytes    = 32 << 10
)

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h,
		ReadHeaderTimeout: apiReadHeaderTimeout, ReadTimeout: apiReadTimeout,
		WriteTimeout: apiWriteTimeout, IdleTimeout: apiIdleTimeout,
		MaxHeaderBytes: apiMaxHeaderBytes, ConnContext: connlimit.ConnContext,
		ErrorLog: slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug)}
}

// isolationNote is what the start-up line says about isolation.
func isolationNote(backend, accel string) string {
	switch {
	case accel == "kvm":
		return "accel kvm"
	case accel != "":
		return "accel " + accel + ": " + api.Isolation(accel)
	default:
		return backend + " backend: " + api.Isolation("")
	}
}

func requireKVMError(accel, why string) error {
	return fmt.Errorf("--require-kvm: microVMs would run under %s (%s), which is not a security boundary; run on a host with a usable /dev/kvm (and --accel kvm or auto), or drop --require-kvm for development", accel, why)
}

// ensureAdminKey creates the first account and its key when the store has
// no key yet, and writes it to path. That account is recorded as the
// operator's, once, before the key exists: the operator is never derived
// from keys, so deleting one promotes nobody.
func ensureAdminKey(ctx context.Context, st store.Store, path string) error {
	keys, err := st.ListAccessKeys(ctx)
	if err != nil {
		return err
	}
	if len(keys) > 0 {
		return nil
	}
	// An operator recorded before (whose keys were all deleted, or a
	// start that crashed before its key was stored) gets the new key.
	account, err := st.GetSetting(ctx, store.SettingOperatorAccount)
	if errors.Is(err, errdefs.ErrNotFound) {
		if account, err = auth.NewAccountID(); err != nil {
			return err
		}
		if err := st.SetSetting(ctx, store.SettingOperatorAccount, account); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	k, err := auth.NewAccessKey(account, "admin (created on first start)")
	if err != nil {
		return err
	}
	// The file first: a key in the store that nobody can read is useless.
	if err := auth.WriteCredentials(path, "default", k); err != nil {
		return err
	}
	if err := st.CreateAccessKey(ctx, k); err != nil {
		return err
	}
	slog.Info("created admin access key", "accessKeyId", k.ID, "account", account, "credentials", path)
	return nil
}

// operatorAccount returns the account that may build from host paths:
// --operator-account if given, else the one recorded on first start, else
// none (a data directory from before kiln recorded it).
func operatorAccount(ctx context.Context, st store.Store, flag string) (string, error) {
	if flag != "" {
		slog.Info("operator account (may build from host paths)", "account", flag, "from", "--operator-account")
		return flag, nil
	}
	account, err := st.GetSetting(ctx, store.SettingOperatorAccount)
	if errors.Is(err, errdefs.ErrNotFound) {
		slog.Warn("no operator account recorded: no account may build from host paths; name one with --operator-account")
		return "", nil
	}
	if err != nil {
		return "", err
	}
	slog.Info("operator account (may build from host paths)", "account", account, "from", "recorded on first start")
	return account, nil
}

// ValidAccount reports whether s is a 12-digit account id.
func ValidAccount(s string) bool {
	if len(s) != 12 {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// managedImages lists the managed bases built under DATA_DIR/base. A base
// not built yet is listed with version "latest": the first build that
// uses it builds it.
func managedImages(dataDir string) func() []api.ManagedImage {
	m := &base.Managed{DataDir: dataDir}
	return func() []api.ManagedImage {
		var out []api.ManagedImage
		for _, name := range m.Names() {
			mi := api.ManagedImage{Name: name}
			vs, _ := m.Versions(name)
			for _, v := range vs {
				mi.Versions = append(mi.Versions, api.ManagedImageVersion{Version: v.Version, Status: "AVAILABLE", CreatedAt: v.CreatedAt})
				if mi.CreatedAt.IsZero() || v.CreatedAt.Before(mi.CreatedAt) {
					mi.CreatedAt = v.CreatedAt
				}
			}
			if len(mi.Versions) == 0 {
				mi.CreatedAt = time.Now().UTC().Truncate(time.Second)
				mi.Versions = []api.ManagedImageVersion{{Version: "latest", Status: "AVAILABLE", CreatedAt: mi.CreatedAt}}
			}
			out = append(out, mi)
		}
		return out
	}
}

// hostMemoryMiB is the host's memory (MemTotal), the allowance the
// console's usage page measures committed microVM memory against; 0 when
// unknown.
func hostMemoryMiB() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			var kib int64
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &kib)
			return kib >> 10
		}
	}
	return 0
}
