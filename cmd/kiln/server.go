package main

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
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/apibench"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/connlimit"
	"github.com/kiln-sandbox/kiln/internal/console"
	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// ServerOptions are the `kiln server` flags, handed to the backend factory.
type ServerOptions struct {
	// Stopping counts the shut-down work a backend runs after ctx ends
	// (closing the VM driver kills the processes started ahead for
	// clones); runServer waits for it before returning.
	Stopping     *sync.WaitGroup
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
	// Health collects readiness checks for /readyz; runServer makes it and
	// the backend adds its own (the VM engine, the endpoint proxy).
	Health *metrics.Health
	// References orders image and artifact references the API records
	// against garbage collection (internal/gc); runServer makes it.
	References *gc.References
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
func (o ServerOptions) DefaultInternetEgress() bool { return o.DefaultEgress == "internet" }

// FetchPolicy is the egress policy of kiln's fetches for tenants.
func (o ServerOptions) FetchPolicy() *egress.Policy {
	return &egress.Policy{ExtraDeny: o.DenyCIDRs, Allow: o.AllowFetchCIDRs}
}

// BackendFactory builds the engine behind the API: it gets the store and
// the Reporter through which it reports state changes, and returns the
// lifecycle.Backend the API hands accepted work to. Optionally it also returns a
// TokenIssuer for the endpoint proxy's tokens (nil: the API's HMAC issuer).
// ctx lives as long as the server.
type BackendFactory func(ctx context.Context, o ServerOptions, st store.Store, rep *lifecycle.Reporter) (lifecycle.Backend, api.TokenIssuer, error)

// backends are the factories `kiln server --backend NAME` can choose; the
// VM engine registers "engine" with RegisterBackend from its own file.
var backends = map[string]BackendFactory{
	"fake": func(ctx context.Context, o ServerOptions, st store.Store, rep *lifecycle.Reporter) (lifecycle.Backend, api.TokenIssuer, error) {
		slog.Warn("using the fake backend: no VMs run, records only move through their states")
		return fakebackend.New(rep, 200*time.Millisecond), nil, nil
	},
}

// cachePruners returns the build caches' pruners (set on Linux, where the
// image builder is).
var cachePruners func(dataDir string) (image, template func(maxAge time.Duration) (int, error))

// RegisterBackend makes a backend available to `kiln server --backend name`.
func RegisterBackend(name string, f BackendFactory) { backends[name] = f }

func init() {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Serve the AWS Lambda MicroVMs-compatible API",
		Long: `Serve the API. On first start it creates an admin access key and writes it
to DATA_DIR/credentials in the AWS shared-credentials format, so that
  AWS_SHARED_CREDENTIALS_FILE=DATA_DIR/credentials AWS_ENDPOINT_URL=http://API_ADDR
is all an AWS SDK or CLI needs. That admin account is recorded as the
operator's, the one account that may build from host paths
(--operator-account names another).

DATA_DIR is kept 0700 and its key files and database 0600; secret access
keys are sealed in the database with DATA_DIR/secrets.key (back it up with
the database: without it the stored keys cannot be used).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return sf.run(cmd, "")
		},
	}
	sf.add(cmd.Flags())
	rootCmd.AddCommand(cmd)
}

// serverFlags are the flags `kiln server` shares with the cluster roles
// that run its parts (`kiln control`, `kiln node`).
type serverFlags struct {
	o                     ServerOptions
	backend               string
	denyCIDRs, allowFetch []string
}

// run checks the flags and runs the server in role ("" = everything).
func (sf *serverFlags) run(cmd *cobra.Command, role string) error {
	o, backend, denyCIDRs, allowFetch := sf.o, sf.backend, sf.denyCIDRs, sf.allowFetch
	o.Role = role
	o.DataDir = dataDir
	var err error
	if o.DenyCIDRs, err = egress.ParseCIDRs(denyCIDRs); err != nil {
		return fmt.Errorf("--deny-cidr: %w", err)
	}
	if o.AllowFetchCIDRs, err = egress.ParseCIDRs(allowFetch); err != nil {
		return fmt.Errorf("--allow-fetch-cidr: %w", err)
	}
	if o.DefaultEgress != "none" && o.DefaultEgress != "internet" {
		return fmt.Errorf("--default-egress %q: want none or internet", o.DefaultEgress)
	}
	for _, r := range o.InsecureRegistries {
		if r == "" || strings.ContainsAny(r, "/ ") {
			return fmt.Errorf("--insecure-registry %q: want HOST:PORT or HOST", r)
		}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runServer(ctx, o, backend)
}

func (sf *serverFlags) add(f *pflag.FlagSet) {
	o := &sf.o
	backend, denyCIDRs, allowFetch := &sf.backend, &sf.denyCIDRs, &sf.allowFetch
	f.StringVar(&o.APIAddr, "api-addr", "127.0.0.1:9090", "address of the API")
	f.StringVar(&o.EndpointAddr, "endpoint-addr", "127.0.0.1:8443", "address of the microVM endpoint proxy (HTTPS)")
	f.StringVar(&o.Domain, "domain", "microvm.localhost", "microVM endpoints are https://ID.DOMAIN")
	f.StringVar(&o.Region, "region", "us-east-1", "region in ARNs")
	f.Int64Var(&o.Quota.Microvms, "max-microvms-per-account", api.DefaultQuota.Microvms, "old name of --quota-microvms")
	f.MarkDeprecated("max-microvms-per-account", "use --quota-microvms")
	f.Int64Var(&o.Quota.Microvms, "quota-microvms", api.DefaultQuota.Microvms, "default quota: microVMs not terminated per account (negative: no limit; `kiln quotas set` changes one account's)")
	f.Int64Var(&o.Quota.MemoryMiB, "quota-memory-mib", api.DefaultQuota.MemoryMiB, "default quota: guest memory MiB of an account's microVMs not terminated")
	f.Int64Var(&o.Quota.VCPUs, "quota-vcpus", api.DefaultQuota.VCPUs, "default quota: vCPUs of an account's microVMs not terminated")
	f.Int64Var(&o.Quota.Builds, "quota-builds", api.DefaultQuota.Builds, "default quota: an account's image builds pending or running at once")
	f.Int64Var(&o.Quota.StorageBytes, "quota-storage-bytes", api.DefaultQuota.StorageBytes, "default quota: bytes of an account's build snapshots (memory and disk) and uploaded code packages")
	f.Float64Var(&o.MemoryOvercommit, "memory-overcommit", 1.0, "guest memory the host may commit to running microVMs and builds, as a ratio of its physical memory; beyond it runs, resumes and builds are refused (0: no check)")
	f.IntVar(&o.MaxConcurrentBuilds, "max-concurrent-builds", 2, "image builds running at once on this host; more wait in a queue")
	f.DurationVar(&o.BuildTimeout, "build-timeout", 60*time.Minute, "longest a whole image build may take before it fails")
	f.IntVar(&o.ClonePool, "clone-pool", 1, "QEMU processes per image version started ahead (jailed, paused, state loaded) so a RunMicrovm skips process start; 0 disables")
	f.Int64Var(&o.BuildLogMaxBytes, "build-log-max-bytes", 10<<20, "bytes of a build's log kept; later output is dropped after a \"truncated\" line")
	f.Float64Var(&o.RequestsPerSecond, "requests-per-second", 0, "API request rate per account before ThrottlingException (0: no limit)")
	f.StringVar(backend, "backend", "engine", "what runs the microVMs: engine, or fake (records only, for trying the API)")
	f.StringArrayVar(denyCIDRs, "deny-cidr", nil, "CIDR (or address) that app VMs, build VMs and kiln's fetches for tenants (ADD <url>, code URIs, registry pulls) may never reach, on top of the built-in deny list; repeatable")
	f.StringArrayVar(allowFetch, "allow-fetch-cidr", nil, "CIDR kiln may fetch from for tenants although the deny list covers it (an internal mirror); never opens guest egress; repeatable")
	f.StringArrayVar(&o.AptMirrors, "apt-mirror", nil, "http:// Debian mirror URI whose downloads by build VMs go through kiln's per-account package cache, besides the http:// mirrors in the host's apt sources; repeatable")
	f.StringArrayVar(&o.InsecureRegistries, "insecure-registry", nil, "registry HOST:PORT (or HOST) pulled over plain HTTP and allowed on a denied address such as loopback; repeatable")
	f.StringVar(&o.OperatorAccount, "operator-account", "", "12-digit account that may build from host paths and file:// URIs (default: the admin account recorded on first start)")
	f.StringVar(&o.APICert, "api-cert", "", "PEM certificate chain: serve the API over HTTPS (with --api-key)")
	f.StringVar(&o.APIKey, "api-key", "", "PEM private key of --api-cert")
	f.IntVar(&o.MaxConnsPerClient, "max-conns-per-client", 256, "concurrent API connections per client address; more are answered 429 and closed (0: no cap)")
	addLogFlags(f, o)
	f.StringVar(&o.NetPool, "net-pool", "", "prefix the VM links' /30s come from (default 10.200.0.0/16)")
	f.Uint32Var(&o.VMUIDBase, "vm-uid-base", 0, "first of the 65536 uids VM processes run as (default 0x6b690000)")
	f.StringVar(&o.CgroupRoot, "cgroup-root", "", "where the host's cgroup file system is mounted; each QEMU gets a cgroup kiln/ID.* there (default /sys/fs/cgroup; in a Pod with a cgroup namespace of its own, mount the host's elsewhere and name it)")
	f.StringVar(&o.HostCgroupNS, "host-cgroupns", "", "the host's cgroup namespace, entered to put QEMU's cgroup outside kiln's own when kiln runs in another (default /proc/1/ns/cgroup, the host's under hostPID; none: never)")
	f.StringVar(&o.RolesFile, "roles-file", "", "JSON file mapping executionRoleArn values to credential sources (a profile of the host's AWS configuration, or an STS AssumeRole), served to each microVM through its metadata service at 169.254.169.254 (IMDSv2); empty: no microVM gets credentials")
	f.StringVar(&o.DefaultEgress, "default-egress", "none", "egress of microVMs and image builds that name no egress connector: none (kiln's default: no network out) or internet (AWS's default: INTERNET_EGRESS, still behind the deny list)")
	f.StringVar(&o.S3Endpoint, "s3-endpoint", "", "S3-compatible endpoint (e.g. http://127.0.0.1:7070) that s3:// code artifacts are read from, with credentials from the standard AWS chain (AWS_ACCESS_KEY_ID..., AWS_PROFILE); empty: AWS's own S3")
	f.StringVar(&o.S3Region, "s3-region", "", "region of --s3-endpoint (default: AWS_REGION or the profile's, then --region)")
	f.BoolVar(&o.S3PathStyle, "s3-path-style", true, "address buckets as ENDPOINT/BUCKET (most self-hosted stores); false: BUCKET.ENDPOINT")
	f.BoolVar(&o.RequireKVM, "require-kvm", false, "refuse to start unless microVMs run under KVM (TCG is not a security boundary)")
	f.StringVar(&o.MetricsAddr, "metrics-addr", "127.0.0.1:9091", "address of /metrics (Prometheus), /healthz and /readyz (empty: off)")
	f.DurationVar(&o.GCInterval, "gc-interval", 10*time.Minute, "how often garbage collection runs (it also runs at start; 0: never)")
	f.DurationVar(&o.TerminatedRetention, "terminated-retention", 24*time.Hour, "how long TERMINATED microVM records and idempotency tokens are kept")
	f.DurationVar(&o.CacheMaxAge, "cache-max-age", 7*24*time.Hour, "how long an unused image-cache or template-cache entry is kept")
}

func runServer(ctx context.Context, o ServerOptions, backend string) error {
	factory, ok := backends[backend]
	if o.Role == "control" {
		factory, ok = controlBackend, true
	}
	if !ok {
		if backend == "engine" {
			return fmt.Errorf("this kiln build has no VM engine linked in; use --backend fake to try the API")
		}
		return fmt.Errorf("unknown backend %q", backend)
	}
	if (o.APICert == "") != (o.APIKey == "") {
		return fmt.Errorf("--api-cert and --api-key go together: give both to serve HTTPS, or neither")
	}
	if o.OperatorAccount != "" && !validAccount(o.OperatorAccount) {
		return fmt.Errorf("--operator-account must be a 12-digit account id, not %q", o.OperatorAccount)
	}
	if o.RequireKVM && backend != "engine" {
		return fmt.Errorf("--require-kvm: the %s backend runs no VMs under KVM", backend)
	}
	st, err := openStore(ctx, o.DataDir)
	if err != nil {
		return err
	}
	defer st.Close()
	if o.Stopping == nil {
		o.Stopping = new(sync.WaitGroup)
	}
	defer waitStopping(o.Stopping, 30*time.Second)
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
			return fmt.Errorf("--metrics-addr %s: %w", o.MetricsAddr, err)
		}
		go func() {
			if err := metrics.Serve(ctx, mln, o.Health); err != nil {
				slog.Error("metrics endpoint stopped", "err", err)
			}
		}()
		slog.Info("metrics and health serving", "addr", mln.Addr().String(), "paths", "/metrics /healthz /readyz")
	}
	if o.Role == "node" {
		if runNode == nil {
			return fmt.Errorf("this kiln build has no VM engine linked in")
		}
		return runNode(ctx, o, st)
	}
	if err := ensureAdminKey(ctx, st, filepath.Join(o.DataDir, "credentials")); err != nil {
		return err
	}
	if o.Quota == (store.Quota{}) {
		o.Quota = api.DefaultQuota
	}
	// `kiln quotas get` shows the limits this server applies.
	if err := st.SetSetting(ctx, SettingQuotaDefaults, string(mustJSON(o.Quota))); err != nil {
		return err
	}
	operator, err := operatorAccount(ctx, st, o.OperatorAccount)
	if err != nil {
		return err
	}
	var operators []string
	if operator != "" {
		operators = []string{operator}
	}
	var tlsConf *tls.Config
	if o.APICert != "" {
		cert, err := tls.LoadX509KeyPair(o.APICert, o.APIKey)
		if err != nil {
			return fmt.Errorf("loading --api-cert and --api-key: %w", err)
		}
		warnIfReadable(o.APIKey)
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	rep := lifecycle.NewReporter(st)
	be, tokens, err := factory(ctx, o, st, rep)
	if err != nil {
		return fmt.Errorf("starting backend: %w", err)
	}
	accel := ""
	if a, ok := be.(interface{ Accel() string }); ok {
		accel = a.Accel()
	}
	if o.RequireKVM && accel != "kvm" {
		return requireKVMError(accel, "reported by the VM engine")
	}
	if accel == "tcg" {
		slog.Warn("microVMs run under TCG: NOT a security boundary; run untrusted tenants only on a KVM host (--require-kvm enforces it)")
	}
	// Secret files the backend made (TLS and token keys) are 0600 on
	// creation; check once more, now that they exist.
	if err := secureDataDir(o.DataDir); err != nil {
		return err
	}
	_, port, _ := net.SplitHostPort(o.EndpointAddr)
	srv := api.NewServer(api.Config{Region: o.Region, Domain: o.Domain, EndpointPort: port, Tokens: tokens,
		Quota: o.Quota, RequestsPerSecond: o.RequestsPerSecond,
		ArtifactDir: filepath.Join(o.DataDir, "artifacts"), OperatorAccounts: operators,
		ManagedSource: managedImages(o.DataDir), Accel: accel, References: o.References,
		DefaultInternetEgress: o.DefaultInternetEgress()}, st, be)
	ln, err := net.Listen("tcp", o.APIAddr)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.APIAddr, err)
	}
	ln = connlimit.New(ln, o.MaxConnsPerClient)
	scheme := "http"
	if tlsConf != nil {
		ln, scheme = tls.NewListener(ln, tlsConf), "https"
	}
	if o.Role == "control" {
		if err := startControlLoops(ctx, o, st, srv, be); err != nil {
			ln.Close()
			return err
		}
	}
	if err := srv.Start(ctx); err != nil {
		ln.Close()
		return err
	}
	if o.GCInterval > 0 {
		// After Start: recovery has claimed what it keeps before the first
		// pass judges orphans.
		cfg := gc.Config{Store: st, DataDir: o.DataDir, References: o.References,
			TerminatedRetention: o.TerminatedRetention, CacheMaxAge: o.CacheMaxAge}
		if e, ok := be.(gc.Engine); ok {
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
	if err := mountE2B(ctx, top, o, st, srv, be, port, operators); err != nil {
		ln.Close()
		return err
	}
	hs := newHTTPServer(connlimit.Handler(top))
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	note := isolationNote(backend, accel)
	if o.Role == "control" {
		note = "cluster control: microVMs run on the nodes"
	}
	fmt.Printf("kiln API serving at %s://%s (%s)\n", scheme, ln.Addr(), note)
	fmt.Printf("kiln console at %s://%s%s (sign in with an access key from the credentials file)\n", scheme, ln.Addr(), console.Prefix)
	select {
	case err := <-errc:
		return fmt.Errorf("serving API: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutting down API: %w", err)
	}
	return nil
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

func validAccount(s string) bool { return len(s) == 12 && allDigits(s) }

// `kiln bench api` joins the bench group that engine.go defines on Linux;
// elsewhere it makes the group itself. Init functions run in file-name
// order, so engine.go's has run by now.
func init() {
	var o apibench.Options
	cmd := &cobra.Command{
		Use:   "api",
		Short: "Benchmark GetMicrovm, ListMicrovms and RunMicrovm (API+store only, no VM) with concurrent signed clients, on SQLite and optionally PostgreSQL; prints JSON on the last line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Printf("%d clients, %d microVM records, %s per operation, GOMAXPROCS %d\n", o.Clients, o.Records, o.Duration, runtime.GOMAXPROCS(0))
			res, err := apibench.Run(cmd.Context(), o, os.Stdout)
			if err != nil {
				return err
			}
			b, err := json.Marshal(res)
			if err != nil {
				return err
			}
			fmt.Println(string(b))
			return nil
		},
	}
	cmd.Flags().IntVar(&o.Clients, "clients", 50, "concurrent signed clients")
	cmd.Flags().IntVar(&o.Records, "records", 10000, "microVM records in the store")
	cmd.Flags().DurationVar(&o.Duration, "duration", 5*time.Second, "measuring time per operation")
	cmd.Flags().IntVar(&o.PageSize, "page-size", 50, "maxResults of ListMicrovms")
	cmd.Flags().StringVar(&o.Dir, "dir", "", "scratch directory for the database (default: the system temp dir)")
	cmd.Flags().StringVar(&o.Store, "store", "sqlite", "sqlite; postgres: SQLite, then PostgreSQL in a private cluster (postgresql-15, make setup); or a postgres:// URL of an empty, disposable database to measure after SQLite")
	var bench *cobra.Command
	for _, c := range rootCmd.Commands() {
		if c.Name() == "bench" {
			bench = c
		}
	}
	if bench == nil {
		bench = &cobra.Command{Use: "bench", Short: "Run kiln's benchmarks"}
		rootCmd.AddCommand(bench)
	}
	bench.AddCommand(cmd)
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
