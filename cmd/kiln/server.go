package main

import (
	"context"
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
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/apibench"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// ServerOptions are the `kiln server` flags, handed to the backend factory.
type ServerOptions struct {
	DataDir      string
	APIAddr      string
	EndpointAddr string
	Domain       string
	Region       string
	// Quotas (0: none).
	MaxMicrovmsPerAccount int
	RequestsPerSecond     float64
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
}

// FetchPolicy is the egress policy of kiln's fetches for tenants.
func (o ServerOptions) FetchPolicy() *egress.Policy {
	return &egress.Policy{ExtraDeny: o.DenyCIDRs, Allow: o.AllowFetchCIDRs}
}

// BackendFactory builds the engine behind the API: it gets the store and
// the Reporter through which it reports state changes, and returns the
// api.Backend the API hands accepted work to. Optionally it also returns a
// TokenIssuer for the endpoint proxy's tokens (nil: the API's HMAC issuer).
// ctx lives as long as the server.
type BackendFactory func(ctx context.Context, o ServerOptions, st store.Store, rep *api.Reporter) (api.Backend, api.TokenIssuer, error)

// backends are the factories `kiln server --backend NAME` can choose; the
// VM engine registers "engine" with RegisterBackend from its own file.
var backends = map[string]BackendFactory{
	"fake": func(ctx context.Context, o ServerOptions, st store.Store, rep *api.Reporter) (api.Backend, api.TokenIssuer, error) {
		slog.Warn("using the fake backend: no VMs run, records only move through their states")
		return fakebackend.New(rep, 200*time.Millisecond), nil, nil
	},
}

// RegisterBackend makes a backend available to `kiln server --backend name`.
func RegisterBackend(name string, f BackendFactory) { backends[name] = f }

func init() {
	var o ServerOptions
	var backend string
	var denyCIDRs, allowFetch []string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Serve the AWS Lambda MicroVMs-compatible API",
		Long: `Serve the API. On first start it creates an admin access key and writes it
to DATA_DIR/credentials in the AWS shared-credentials format, so that
  AWS_SHARED_CREDENTIALS_FILE=DATA_DIR/credentials AWS_ENDPOINT_URL=http://API_ADDR
is all an AWS SDK or CLI needs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.DataDir = dataDir
			var err error
			if o.DenyCIDRs, err = egress.ParseCIDRs(denyCIDRs); err != nil {
				return fmt.Errorf("--deny-cidr: %w", err)
			}
			if o.AllowFetchCIDRs, err = egress.ParseCIDRs(allowFetch); err != nil {
				return fmt.Errorf("--allow-fetch-cidr: %w", err)
			}
			for _, r := range o.InsecureRegistries {
				if r == "" || strings.ContainsAny(r, "/ ") {
					return fmt.Errorf("--insecure-registry %q: want HOST:PORT or HOST", r)
				}
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runServer(ctx, o, backend)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.APIAddr, "api-addr", "127.0.0.1:9090", "address of the API")
	f.StringVar(&o.EndpointAddr, "endpoint-addr", "127.0.0.1:8443", "address of the microVM endpoint proxy (HTTPS)")
	f.StringVar(&o.Domain, "domain", "microvm.localhost", "microVM endpoints are https://ID.DOMAIN")
	f.StringVar(&o.Region, "region", "us-east-1", "region in ARNs")
	f.IntVar(&o.MaxMicrovmsPerAccount, "max-microvms-per-account", 0, "quota of microVMs not terminated per account (0: none)")
	f.Float64Var(&o.RequestsPerSecond, "requests-per-second", 0, "API request rate per account before ThrottlingException (0: no limit)")
	f.StringVar(&backend, "backend", "engine", "what runs the microVMs: engine, or fake (records only, for trying the API)")
	f.StringArrayVar(&denyCIDRs, "deny-cidr", nil, "CIDR (or address) that app VMs, build VMs and kiln's fetches for tenants (ADD <url>, code URIs, registry pulls) may never reach, on top of the built-in deny list; repeatable")
	f.StringArrayVar(&allowFetch, "allow-fetch-cidr", nil, "CIDR kiln may fetch from for tenants although the deny list covers it (an internal mirror); never opens guest egress; repeatable")
	f.StringArrayVar(&o.InsecureRegistries, "insecure-registry", nil, "registry HOST:PORT (or HOST) pulled over plain HTTP and allowed on a denied address such as loopback; repeatable")
	rootCmd.AddCommand(cmd)
}

func runServer(ctx context.Context, o ServerOptions, backend string) error {
	factory, ok := backends[backend]
	if !ok {
		if backend == "engine" {
			return fmt.Errorf("this kiln build has no VM engine linked in; use --backend fake to try the API")
		}
		return fmt.Errorf("unknown backend %q", backend)
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data directory: %w", err)
	}
	st, err := sqlite.Open(ctx, filepath.Join(o.DataDir, "kiln.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	admin, err := ensureAdminKey(ctx, st, filepath.Join(o.DataDir, "credentials"))
	if err != nil {
		return err
	}
	rep := api.NewReporter(st)
	be, tokens, err := factory(ctx, o, st, rep)
	if err != nil {
		return fmt.Errorf("starting backend: %w", err)
	}
	_, port, _ := net.SplitHostPort(o.EndpointAddr)
	srv := api.NewServer(api.Config{Region: o.Region, Domain: o.Domain, EndpointPort: port, Tokens: tokens,
		MaxMicrovmsPerAccount: o.MaxMicrovmsPerAccount, RequestsPerSecond: o.RequestsPerSecond,
		ArtifactDir: filepath.Join(o.DataDir, "artifacts"), OperatorAccounts: []string{admin},
		ManagedSource: managedImages(o.DataDir)}, st, be)
	ln, err := net.Listen("tcp", o.APIAddr)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.APIAddr, err)
	}
	if err := srv.Start(ctx); err != nil {
		ln.Close()
		return err
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	fmt.Printf("kiln API serving at http://%s\n", ln.Addr())
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

// ensureAdminKey creates the first account and its key when the store has
// no key yet, and writes it to path. It returns the admin account: that of
// the oldest key, the operator who may build from local paths.
func ensureAdminKey(ctx context.Context, st store.Store, path string) (string, error) {
	keys, err := st.ListAccessKeys(ctx)
	if err != nil {
		return "", err
	}
	if len(keys) > 0 {
		return keys[0].Account, nil
	}
	account, err := auth.NewAccountID()
	if err != nil {
		return "", err
	}
	k, err := auth.NewAccessKey(account, "admin (created on first start)")
	if err != nil {
		return "", err
	}
	// The file first: a key in the store that nobody can read is useless.
	if err := auth.WriteCredentials(path, "default", k); err != nil {
		return "", err
	}
	if err := st.CreateAccessKey(ctx, k); err != nil {
		return "", err
	}
	slog.Info("created admin access key", "accessKeyId", k.ID, "account", account, "credentials", path)
	return account, nil
}

// `kiln bench api` joins the bench group that engine.go defines on Linux;
// elsewhere it makes the group itself. Init functions run in file-name
// order, so engine.go's has run by now.
func init() {
	var o apibench.Options
	cmd := &cobra.Command{
		Use:   "api",
		Short: "Benchmark GetMicrovm and ListMicrovms with concurrent signed clients; prints JSON on the last line",
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
