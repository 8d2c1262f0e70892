//go:build linux

package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/applog"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/e2b/envd"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
	"github.com/kiln-sandbox/kiln/internal/imds"
	"github.com/kiln-sandbox/kiln/internal/jail"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/server/endpoint"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// The "engine" backend of `kiln server`: real microVMs (internal/engine on
// the QEMU driver), their networks, and the HTTPS endpoint proxy on
// --endpoint-addr with kiln's own CA (DATA_DIR/ca.pem) and signed tokens.
func init() {
	engineBackend = newEngineBackend
	cachePruners = func(dataDir string) (func(time.Duration) (int, error), func(time.Duration) (int, error)) {
		return func(maxAge time.Duration) (int, error) { return image.PruneCache(dataDir, maxAge) },
			func(maxAge time.Duration) (int, error) {
				return imagebuild.PruneTemplateCache(filepath.Join(dataDir, "template-cache"), maxAge)
			}
	}
}

func newEngineBackend(ctx context.Context, o Options, st store.Store, rep *lifecycle.Reporter) (backend, error) {
	log := o.logger()
	eng, _, err := startEngine(ctx, o, st, rep, "", nil, log)
	if err != nil {
		return backend{}, err
	}
	// On failure the driver stops with ctx like on success (startEngine).
	key, err := LoadTokenKey(o)
	if err != nil {
		return backend{}, err
	}
	pcfg := proxy.Config{Backend: eng, ShellHandler: eng.ShellHandler(), Logger: log}
	if es, ok := st.(store.E2BStore); ok {
		// E2B's envd runs here on the host, over the guest agent: see
		// docs/ARCHITECTURE.md, "E2B-compatible API".
		pcfg.Envd = e2b.EndpointGate(key, es)
		pcfg.Envd.Handler = newEnvdHandler(st, es, eng)
	}
	ep, err := endpoint.Start(ctx, endpoint.Config{Addr: o.EndpointAddr, DataDir: o.DataDir, CertFile: o.EndpointCert, KeyFile: o.EndpointKey,
		Key: key, Domain: o.Domain, Proxy: pcfg})
	if err != nil {
		return backend{}, err
	}
	go func() {
		if err := ep.Wait(); err != nil {
			slog.Error("endpoint proxy stopped", "err", err)
		}
	}()
	if o.Health != nil {
		o.Health.Set("endpoint proxy", metrics.DialCheck(ep.Addr))
	}
	log.Info("microvm endpoints serving", "addr", ep.Addr, "domain", o.Domain, "ca", ep.CAFile)
	return backend{Backend: eng, Tokens: &engine.TokenIssuer{Signer: ep.Signer}, Signer: ep.Signer, Engine: eng, EndpointAddr: ep.Addr}, nil
}

// envd adopts a resumed sandbox's processes at once only with the
// engine's notice.
var _ envd.ChangeNotifier = (*engine.Engine)(nil)

// newEnvdHandler is E2B's envd served on the host over the guest agent
// (docs/ARCHITECTURE.md, "E2B-compatible API"), for the microVM and
// account the endpoint proxy (or a node's tunnel) names in the request.
func newEnvdHandler(st store.Store, es store.E2BStore, eng *engine.Engine) http.Handler {
	return envd.New(envd.Config{Agents: eng, Sandboxes: es, Target: func(ctx context.Context) (string, string) {
		return proxy.MicrovmID(ctx), proxy.Account(ctx)
	}, App: func(ctx context.Context, account, id string) (envd.App, error) {
		m, err := st.GetMicrovm(ctx, account, id)
		if err != nil {
			return envd.App{}, err
		}
		app, _, err := eng.App(m.Account, m.ImageName, m.ImageVersion)
		return envd.App{Env: app.Env, WorkingDir: app.WorkingDir, User: app.User}, err
	}})
}

// startEngine starts this host's VM engine (for `kiln server`, and for
// `kiln node` as node) on o.Driver or else a QEMU driver it starts, which
// adopts the VMs still running. The engine runs until ctx ends, and then
// it and a driver of its own close (counted in o.Stopping).
func startEngine(ctx context.Context, o Options, st store.Store, rep *lifecycle.Reporter, node string, fetch engine.TemplateFetcher, log *slog.Logger) (*engine.Engine, vmm.Driver, error) {
	accel := o.Accel
	if accel == "" {
		accel = "auto"
	}
	if o.RequireKVM && o.Driver == nil {
		// Checked before the driver starts: it would adopt running VMs.
		a, why, err := qemu.ResolveAccel(accel)
		if err != nil {
			return nil, nil, err
		}
		if a != vmm.AccelKVM {
			return nil, nil, requireKVMError(string(a), why)
		}
	}
	// The logs first: the driver adopts running VMs as it starts, and
	// their consoles go to their logs.
	logs, err := applog.New(filepath.Join(o.DataDir, "logs"), applog.Options{MaxBytes: o.LogMaxBytes, Retention: o.LogRetention, Log: log})
	if err != nil {
		return nil, nil, err
	}
	// Before the driver: it adopts running VMs by their cgroups.
	if err := jail.Configure(jail.Config{CgroupRoot: o.CgroupRoot, HostCgroupNS: o.HostCgroupNS}); err != nil {
		return nil, nil, fmt.Errorf("--cgroup-root/--host-cgroupns: %w", err)
	}
	if jail.Supported() == nil {
		if err := jail.CheckCgroupPlacement(); err != nil {
			return nil, nil, err
		}
	}
	var pool netip.Prefix
	if o.NetPool != "" {
		if pool, err = netip.ParsePrefix(o.NetPool); err != nil || !pool.Addr().Is4() || pool.Bits() > 29 {
			return nil, nil, fmt.Errorf("--net-pool %q: want an IPv4 prefix of /29 or wider, such as 10.201.0.0/16", o.NetPool)
		}
	}
	drv, owned := o.Driver, o.Driver == nil
	if owned {
		q, err := qemu.New(ctx, qemu.Config{DataDir: o.DataDir, Accel: accel, UIDBase: o.VMUIDBase,
			AgentBinary: qemu.DefaultAgentBinary(o.DataDir), Console: logs.Console, PoolSize: o.ClonePool, Log: log})
		if err != nil {
			return nil, nil, fmt.Errorf("starting the vm engine (run `make setup` first?): %w", err)
		}
		drv = q
	}
	closeDriver := func() {
		if owned {
			drv.Close() // VMs keep running; the next start adopts them
		}
	}
	s3cfg, err := source.S3FromEnvironment(ctx, o.S3Endpoint, o.S3Region, o.Region, o.S3PathStyle)
	if err != nil {
		closeDriver()
		return nil, nil, err
	}
	var roles *imds.RolesFile
	if o.RolesFile != "" {
		if roles, err = imds.OpenRolesFile(ctx, o.RolesFile); err != nil {
			closeDriver()
			return nil, nil, fmt.Errorf("--roles-file: %w", err)
		}
		log.Info("execution roles loaded (the file is re-read when it changes)", "file", o.RolesFile, "roles", roles.Len())
	}
	cfg := engine.Config{Driver: drv, SharedDriver: !owned, Control: lifecycle.NewStoreControl(st), Roles: roles, Node: node, FetchTemplate: fetch, NetPool: pool,
		DataDir: o.DataDir, ExtraDeny: o.DenyCIDRs, Logs: logs, Log: log,
		MemoryOvercommit: o.MemoryOvercommit, MaxConcurrentBuilds: o.MaxConcurrentBuilds,
		BuildTimeout: o.BuildTimeout, BuildLogMaxBytes: o.BuildLogMaxBytes}
	if q, ok := drv.(*qemu.Driver); ok {
		cfg.Builder = newImageBuilder(o, q, s3cfg, st, log)
	}
	if o.EngineConfig != nil {
		o.EngineConfig(&cfg)
	}
	eng, err := engine.New(ctx, cfg)
	if err != nil {
		closeDriver()
		return nil, nil, err
	}
	go eng.Run(ctx)
	if o.Health != nil {
		o.Health.Set("vm engine", eng.Ready)
	}
	if o.Stopping != nil {
		o.Stopping.Add(1)
	}
	go func() {
		if o.Stopping != nil {
			defer o.Stopping.Done()
		}
		<-ctx.Done()
		eng.Close()
		if !owned {
			return
		}
		closeDriver()
		// With no VM network left, undo kiln's host settings (the nftables
		// table, ip_forward); with VMs running they stay for them.
		if done, err := netns.RestoreHost(); err != nil {
			log.Warn("restoring host network settings", "err", err)
		} else if done {
			log.Info("no vm networks left: removed the kiln nftables table and restored net.ipv4.ip_forward")
		}
	}()
	return eng, drv, nil
}

// newImageBuilder adapts internal/imagebuild to engine.Builder. Build VMs
// run on the same driver as microVMs (one data directory, one recovery).
func newImageBuilder(o Options, drv *qemu.Driver, s3cfg *source.S3Config, st store.Store, log *slog.Logger) engine.Builder {
	bases := &base.Managed{DataDir: o.DataDir, Logger: log}
	// Everything a tenant names (ADD <url>, code URI, FROM registry) is
	// fetched through one egress policy.
	pol := o.FetchPolicy()
	pkgs := newPackageProxy(o.DataDir, o.AptMirrors, log)
	src := source.Config{AllowLocal: true, HTTPClient: pol.Client(0), S3: s3cfg}
	// A cluster's uploads are in the store (kiln-upload://), which a node
	// shares with control and not its data dir; the builder reads only the
	// building account's (imagebuild sets the account).
	if up, ok := st.(store.Uploads); ok {
		src.Uploads = up
	}
	return &imageBuilder{defaultEgress: o.DefaultInternetEgress(), b: &imagebuild.Builder{
		Images: &image.Builder{DataDir: o.DataDir, Runner: &imagebuild.Runner{Driver: drv, ExtraDeny: o.DenyCIDRs, Packages: pkgs, Logger: log,
			// RUN steps start as clones of a booted build VM (warm.go).
			WarmDir: filepath.Join(o.DataDir, "build-warm")},
			// oci-archives unpack on the data disk, not in a tmpfs /tmp.
			Bases: &base.Resolver{Managed: bases, InsecureRegistries: o.InsecureRegistries, Egress: pol, Logger: log,
				ScratchDir: filepath.Join(o.DataDir, "tmp")},
			HTTPClient: pol.Client(10 * time.Minute), Logger: log},
		Driver:    drv,
		ExtraDeny: o.DenyCIDRs,
		Packages:  pkgs,
		// The API already decided which accounts may build from local
		// paths (operators, and everyone's own uploads). s3:// is read
		// with the operator's credentials from the store the operator
		// named (--s3-endpoint), so it is not a tenant-chosen address.
		Source:   src,
		CacheDir: filepath.Join(o.DataDir, "template-cache"),
		// A cached snapshot holds the agent it was built with.
		CacheSalt: drv.GuestBuild(),
		Logger:    log,
	}}
}

// newPackageProxy is the package proxy for build VMs (internal/pkgproxy)
// on the host's http:// apt mirrors plus extra, caching under
// dataDir/pkg-cache; nil (with a warning) when there is no such mirror:
// builds then reach mirrors only where the deny list lets them.
func newPackageProxy(dataDir string, extra []string, log *slog.Logger) *pkgproxy.Proxy {
	mirrors, err := pkgproxy.HostMirrors("", extra)
	if err == nil {
		var p *pkgproxy.Proxy
		if p, err = pkgproxy.New(pkgproxy.Config{Mirrors: mirrors, Dir: filepath.Join(dataDir, "pkg-cache"), Logger: log}); err == nil {
			log.Info("package proxy for build vms", "mirrors", len(mirrors))
			return p
		}
	}
	log.Warn("package proxy off: build vms reach Debian mirrors only where the deny list allows", "err", err)
	return nil
}

type imageBuilder struct {
	b *imagebuild.Builder
	// defaultEgress: a build whose image names no egress connector gets
	// internet egress (--default-egress internet).
	defaultEgress bool
}

var _ engine.BuildSizer = (*imageBuilder)(nil)

// BuildMemoryMiB implements engine.BuildSizer: a build runs its RUN steps'
// build VMs, then the image VM, one at a time.
func (ib *imageBuilder) BuildMemoryMiB(v store.ImageVersion) int64 {
	mem := imagebuild.DefaultMemoryMiB
	if rs := v.Config.Resources; len(rs) > 0 {
		if m, err := imagebuild.MemoryFor(rs[0].MinimumMemoryInMiB); err == nil {
			mem = m
		}
	}
	run := imagebuild.DefaultRunMemoryMiB
	if r, ok := ib.b.Images.Runner.(*imagebuild.Runner); ok && r.MemoryMiB > 0 {
		run = r.MemoryMiB
	}
	return int64(max(mem, run))
}

func (ib *imageBuilder) Build(ctx context.Context, req engine.BuildRequest) (engine.BuildResult, error) {
	cfg := req.Version.Config
	r := imagebuild.Request{Account: req.Version.Account, Env: cfg.EnvironmentVariables, Log: req.Log, OutDir: req.OutDir,
		Egress: slices.ContainsFunc(cfg.EgressNetworkConnectors, func(a string) bool { return strings.HasSuffix(a, ":"+engine.ConnInternetEgress) }) ||
			(len(cfg.EgressNetworkConnectors) == 0 && ib.defaultEgress),
		// additionalOsCapabilities: ALL is the only value AWS defines.
		AllCaps: slices.Contains(cfg.AdditionalOsCapabilities, "ALL")}
	if cfg.CodeArtifact != nil {
		r.Source = cfg.CodeArtifact.URI
	}
	if len(cfg.Resources) > 0 {
		// The largest of the sizes asked for; the snapshot records it and
		// the vCPUs it implies, so every microVM of the version runs so.
		var most int64
		for _, res := range cfg.Resources {
			most = max(most, res.MinimumMemoryInMiB)
		}
		mem, err := imagebuild.MemoryFor(most)
		if err != nil {
			return engine.BuildResult{}, &buildFailure{reason: "resources: " + err.Error(), err: err}
		}
		r.MemoryMiB = mem
		r.VCPUs = api.VCPUsFor(int64(mem))
	}
	if h := cfg.Hooks; h != nil {
		if h.Port != nil {
			r.Hooks.Port = int(*h.Port)
		}
		if ih := h.MicrovmImageHooks; ih != nil {
			r.Hooks.Ready = ih.Ready == "ENABLED"
			r.Hooks.Validate = ih.Validate == "ENABLED"
			if ih.ReadyTimeoutInSeconds != nil {
				r.Hooks.ReadyTimeout = time.Duration(*ih.ReadyTimeoutInSeconds) * time.Second
			}
			if ih.ValidateTimeoutInSeconds != nil {
				r.Hooks.ValidateTimeout = time.Duration(*ih.ValidateTimeoutInSeconds) * time.Second
			}
		}
	}
	res, err := ib.b.Build(ctx, r)
	if err != nil {
		var be *imagebuild.Error
		if errors.As(err, &be) && be.Reason != "" {
			return engine.BuildResult{}, &buildFailure{reason: be.Reason, err: err}
		}
		return engine.BuildResult{}, err
	}
	mem := int64(res.Template.MemoryMiB) << 20
	snap := &store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem}
	if fi, err := os.Stat(res.RootDisk); err == nil {
		n := fi.Size()
		snap.DiskSnapshotSizeInBytes = &n
	}
	return engine.BuildResult{TemplateDir: res.TemplateDir, Snapshot: snap,
		App: &engine.AppConfig{Env: res.AppEnv, WorkingDir: res.Config.WorkingDir, User: res.Config.User}}, nil
}

// buildFailure shows the builder's reason (the failed step and the last
// lines of its log), which is what the version records.
type buildFailure struct {
	reason string
	err    error
}

func (f *buildFailure) Error() string { return f.reason }
func (f *buildFailure) Unwrap() error { return f.err }
