//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/applog"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/imds"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

var (
	_ lifecycle.Backend   = (*Engine)(nil)
	_ lifecycle.Recoverer = (*Engine)(nil)
	_ lifecycle.Aware     = (*Engine)(nil)
	_ proxy.Backend       = (*Engine)(nil)
	_ api.TokenIssuer     = (*TokenIssuer)(nil)
)

// Connector names (the last part of a network connector ARN).
const (
	ConnAllIngress     = "aws-network-connector:ALL_INGRESS"
	ConnNoIngress      = "aws-network-connector:NO_INGRESS"
	ConnShellIngress   = "aws-network-connector:SHELL_INGRESS"
	ConnInternetEgress = "aws-network-connector:INTERNET_EGRESS"
)

// Hook paths on the app's hooks port (AWS Lambda MicroVMs runtime API).
const (
	HookRun       = "/aws/lambda-microvms/runtime/v1/run"
	HookResume    = "/aws/lambda-microvms/runtime/v1/resume"
	HookSuspend   = "/aws/lambda-microvms/runtime/v1/suspend"
	HookTerminate = "/aws/lambda-microvms/runtime/v1/terminate"
	// DefaultHooksPort is used when the image's hooks name no port: the
	// app's own port, where a single-listener app serves its hooks too.
	DefaultHooksPort = 8080
	// defaultHookTimeout applies when the image gives no timeout for a
	// run, resume, suspend or terminate hook. AWS documents no default
	// (the model gives the range 1-60 s; the developer guide asks for
	// explicit values), so kiln takes the longest AWS allows: a hook AWS
	// would let finish never fails here for want of time, and a failed
	// /run terminates the microVM. docs/COMPATIBILITY.md, "Hooks".
	defaultHookTimeout = 60 * time.Second
)

// Builder turns an image version into a snapshot template. The image
// builder (internal/imagebuild) satisfies it through a small adapter in
// cmd/kiln, so that this package does not depend on the builder's types.
type Builder interface {
	// Build builds b (a build of v) into a template under req.OutDir and
	// returns where the template is. Build output goes to req.Log as it
	// happens. Cancelling ctx abandons the build.
	Build(ctx context.Context, req BuildRequest) (BuildResult, error)
}

// BuildRequest is one build to perform.
type BuildRequest struct {
	Version store.ImageVersion
	Build   store.Build
	OutDir  string    // an empty directory owned by this build
	Log     io.Writer // build output, streamed into the store
}

// BuildResult is a finished build.
type BuildResult struct {
	TemplateDir string // a vmm template directory (made by Driver.Snapshot)
	Snapshot    *store.SnapshotBuild
	// App is how the snapshot's app was started; nil: not known.
	App *AppConfig
}

// AppConfig is the environment, working directory and user a version's
// app was started with. E2B's envd runs sandbox commands with them, as
// E2B runs commands with the template's ENV, WORKDIR and USER.
type AppConfig struct {
	Env        []string `json:"env"`
	WorkingDir string   `json:"workingDir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// Config configures an Engine.
type Config struct {
	Driver vmm.Driver
	// SharedDriver says Driver also runs VMs that are not this engine's: a
	// driver its caller owns and hands to several servers in turn (tests,
	// benchmarks). Recovery and garbage collection then remove only the
	// unclaimed VMs whose networks this data directory made, and leave
	// build VMs to their builds: another server's VMs on the driver have
	// no record in this engine's store, yet are not leftovers.
	SharedDriver bool
	// Control is the control plane the engine reports to and asks (it
	// holds no store): lifecycle.NewStoreControl over the store.
	Control ControlPlane
	// Builder builds images; nil fails every build with a clear reason.
	Builder Builder
	// DataDir holds DataDir/images/ACCOUNT/IMAGE/VERSION (build outputs
	// and the pointer to each version's template).
	DataDir string
	// NetPool, ExtraDeny and DNSUpstreams are passed to internal/netns and
	// internal/dnsfwd (zero values: their defaults).
	NetPool      netip.Prefix
	ExtraDeny    []netip.Prefix
	DNSUpstreams []string
	// Roles are the execution roles' credentials (internal/imds, the
	// operator's roles file), served to a VM that names the role in
	// executionRoleArn through its own metadata service. nil: no VM gets
	// credentials.
	Roles *imds.RolesFile
	// IdleInterval is how often the idle controller looks (default 1s).
	IdleInterval time.Duration
	// StartTimeout bounds a clone plus its run hook (default 2 min).
	StartTimeout time.Duration
	// MemoryOvercommit bounds the guest memory committed to running VMs
	// (microVMs and builds) to this ratio of HostMemoryMiB (0: no bound).
	MemoryOvercommit float64
	// HostMemoryMiB is the host's physical memory (default: MemTotal).
	HostMemoryMiB int64
	// MaxConcurrentBuilds run at once; more wait in a queue (default 2).
	MaxConcurrentBuilds int
	// BuildTimeout bounds a whole build, from when it gets a slot
	// (default 60 min).
	BuildTimeout time.Duration
	// BuildLogMaxBytes caps a build's log (default 10 MiB).
	BuildLogMaxBytes int64
	// Logs keeps each microVM's output on disk (default: DataDir/logs
	// with applog's defaults). The QEMU driver's console sink should be
	// Logs.Console, so that the guest console lands there too.
	Logs *applog.Manager
	// LogSweepInterval is how often expired logs are removed (default 10m).
	LogSweepInterval time.Duration
	// MeterInterval is how often open usage intervals are written to the
	// store (default 60s): a crash loses at most that much usage.
	MeterInterval time.Duration
	Log           *slog.Logger
	Now           func() time.Time
	// Node is this host's name in a cluster (`kiln node`): the engine then
	// owns only the microVMs placed on it (store.Microvm.Node) and leaves
	// every other record to its own node. "" on a single `kiln server`,
	// whose records all have Node "".
	Node string
	// FetchTemplate, when set, gets the template of an image version this
	// host lacks before a start (a cluster node fetches it from another).
	FetchTemplate TemplateFetcher
}

// Engine runs microVMs. Create it with New, hand it to api.NewServer (which
// calls SetServer), and run Run for the driver's events and the idle
// controller.
type Engine struct {
	cfg Config
	log *slog.Logger
	now func() time.Time

	ctx    context.Context // the engine's life; VM work runs under it
	cancel context.CancelFunc

	// tmplMu serialises template fetches (resolveTemplate).
	tmplMu sync.Mutex

	mu  sync.Mutex
	vms map[string]*vmState

	buildWG sync.WaitGroup
	queue   *buildQueue
	buildMu sync.Mutex
	builds  map[string]*buildRun // by versionKey: builds queued or running

	commitMu     sync.Mutex
	committed    map[string]int64 // guest memory MiB by VM id or "build/ID"
	committedMiB int64

	meter meter
}

// vmState is what the engine keeps in memory about one microVM that is not
// terminated. Routing facts are fixed for the VM's life.
type vmState struct {
	id, account    string
	image, version string
	maxIdle        time.Duration // 0: no idle policy
	ingress        bool
	shell          bool
	egress         bool
	role           string // executionRoleArn ("" = none)
	// epoch is the placement epoch of the latest request for the VM: its
	// reports are refused once the microVM was placed anew elsewhere.
	epoch int64

	op sync.Mutex // serialises start/suspend/resume/terminate

	mu     sync.Mutex
	ctx    context.Context // cancelled by terminate
	cancel context.CancelFunc
	// g is the VM's network, DNS forwarder and metadata service, and
	// the driver's VM of this id: nil until made or found again.
	g          *guestvm.VM
	running    bool      // last reported RUNNING; cleared as a suspend begins (idle check, proxy RunningNow)
	open       int       // proxied requests/streams in flight
	lastActive time.Time // last proxied activity (or the last RUNNING)
	flushedAt  time.Time // last time activity was written to the store
	changed    chan struct{}
	gone       bool
	size       vmSize // for metering; zero until first known
	// allowDomains are the domain patterns of its egress policy (E2B's
	// allowOut names): DNS answers for them open their addresses.
	allowDomains []string
}

// New returns an Engine; ctx is the server's life.
func New(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.Driver == nil || cfg.Control == nil || cfg.DataDir == "" {
		return nil, fmt.Errorf("engine: driver, control plane and data dir are required: %w", errdefs.ErrInvalid)
	}
	if cfg.IdleInterval <= 0 {
		cfg.IdleInterval = time.Second
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 2 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MemoryOvercommit > 0 && cfg.HostMemoryMiB <= 0 {
		n, err := hostMemoryMiB()
		if err != nil {
			return nil, err
		}
		cfg.HostMemoryMiB = n
	}
	if cfg.MaxConcurrentBuilds <= 0 {
		cfg.MaxConcurrentBuilds = 2
	}
	if cfg.BuildTimeout <= 0 {
		cfg.BuildTimeout = 60 * time.Minute
	}
	if cfg.BuildLogMaxBytes <= 0 {
		cfg.BuildLogMaxBytes = 10 << 20
	}
	if cfg.LogSweepInterval <= 0 {
		cfg.LogSweepInterval = 10 * time.Minute
	}
	if cfg.MeterInterval <= 0 {
		cfg.MeterInterval = time.Minute
	}
	if cfg.Logs == nil {
		l, err := applog.New(filepath.Join(cfg.DataDir, "logs"), applog.Options{Log: cfg.Log})
		if err != nil {
			return nil, err
		}
		cfg.Logs = l
	}
	e := &Engine{cfg: cfg, log: cfg.Log, now: cfg.Now, vms: map[string]*vmState{},
		queue: newBuildQueue(cfg.MaxConcurrentBuilds), builds: map[string]*buildRun{}, committed: map[string]int64{}}
	e.ctx, e.cancel = context.WithCancel(context.WithoutCancel(ctx))
	return e, nil
}

// SetLifecycle implements lifecycle.Aware for a control plane that is
// (lifecycle.StoreControl): lifecycle.New hands the Service to its backend,
// the engine, while it is the control plane that sends the idle
// controller's suspends and the proxy's wakes through it.
func (e *Engine) SetLifecycle(s *lifecycle.Service) {
	if a, ok := e.cfg.Control.(lifecycle.Aware); ok {
		a.SetLifecycle(s)
	}
}

// Run handles the driver's events and runs the idle controller until ctx
// ends. Call it once, after the API server's Start (recovery).
func (e *Engine) Run(ctx context.Context) {
	go e.idleLoop(ctx)
	go e.memoryLoop(ctx)
	go e.sweepLogs(ctx, e.cfg.LogSweepInterval)
	go e.meterLoop(ctx, e.cfg.MeterInterval)
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-e.cfg.Driver.Events():
			if !ok {
				return
			}
			e.handleEvent(ev)
		}
	}
}

// Accel names the accelerator the driver runs VMs under ("kvm", "tcg"),
// or "" if the driver does not say; the API reports it (GET /kiln/v1/info).
func (e *Engine) Accel() string {
	if p, ok := e.cfg.Driver.(interface{ Platform() vmm.Platform }); ok {
		return string(p.Platform().Accel)
	}
	return ""
}

// Close abandons work in flight (VMs keep running, to be adopted by the
// next Recover) and waits for builds to stop.
func (e *Engine) Close() error {
	e.cancel()
	e.buildWG.Wait()
	// The last checkpoint; then this engine meters no more (the next
	// process closes what is open at that checkpoint).
	e.meterCheckpoint(context.Background())
	e.meter.mu.Lock()
	e.meter.open = nil
	e.meter.mu.Unlock()
	e.cfg.Logs.CloseAll()
	// The VMs outlive this engine; their metadata and DNS listeners
	// belong to this process and go with it, so the next engine can bind
	// them.
	e.mu.Lock()
	states := make([]*vmState, 0, len(e.vms))
	for _, v := range e.vms {
		states = append(states, v)
	}
	e.mu.Unlock()
	for _, v := range states {
		v.mu.Lock()
		g := v.g
		v.mu.Unlock()
		if g != nil {
			g.Detach()
		}
	}
	return nil
}

// connector reports whether list names the managed connector name.
func connector(list []string, name string) bool {
	for _, a := range list {
		if strings.HasSuffix(a, ":"+name) {
			return true
		}
	}
	return false
}

// state returns the in-memory state of m, creating it if needed.
func (e *Engine) state(m store.Microvm) *vmState {
	v, made := e.newState(m)
	if made {
		e.openLog(v.ctx, m)
	}
	v.mu.Lock()
	v.epoch = max(v.epoch, m.Epoch)
	v.mu.Unlock()
	return v
}

func (e *Engine) newState(m store.Microvm) (*vmState, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if v, ok := e.vms[m.ID]; ok {
		return v, false
	}
	ingress, shell := proxy.ConnectorAccess(m.IngressNetworkConnectors)
	v := &vmState{id: m.ID, account: m.Account, image: m.ImageName, version: m.ImageVersion,
		ingress: ingress, shell: shell,
		egress:  connector(m.EgressNetworkConnectors, ConnInternetEgress),
		role:    m.ExecutionRoleArn,
		changed: make(chan struct{}),
	}
	if p := m.IdlePolicy; p != nil && p.MaxIdleDurationSeconds > 0 {
		v.maxIdle = time.Duration(p.MaxIdleDurationSeconds) * time.Second
	}
	v.ctx, v.cancel = context.WithCancel(e.ctx)
	v.epoch = m.Epoch
	e.vms[m.ID] = v
	return v, true
}

func (e *Engine) lookup(id string) *vmState {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.vms[id]
}

// forget drops a terminated microVM; its log stays on disk for the
// retention period.
func (e *Engine) forget(v *vmState) {
	e.release(v.id)
	if err := e.cfg.Logs.Close(v.id); err != nil {
		e.log.Warn("closing the microvm log", "microvm", v.id, "err", err)
	}
	e.mu.Lock()
	if e.vms[v.id] == v {
		delete(e.vms, v.id)
	}
	e.mu.Unlock()
	v.mu.Lock()
	v.gone = true
	v.mu.Unlock()
	v.notify()
}

// notify wakes everyone waiting for a state change of v.
func (v *vmState) notify() {
	v.mu.Lock()
	close(v.changed)
	v.changed = make(chan struct{})
	v.mu.Unlock()
}

// placement is the epoch the VM's reports are made under.
func (v *vmState) placement() int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.epoch
}

func (v *vmState) waitChan() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.changed
}

// report moves the microVM to a state and wakes waiters.
func (e *Engine) report(ctx context.Context, v *vmState, from []store.MicrovmState, to store.MicrovmState, reason string) (store.Microvm, error) {
	m, err := e.cfg.Control.ReportMicrovmState(context.WithoutCancel(ctx), v.account, v.id, v.placement(), from, to, reason)
	if err == nil && (to == store.StateSuspended || to == store.StateTerminated) {
		e.release(v.id) // its memory is on disk, or gone
	}
	if err == nil {
		e.meterVM(context.WithoutCancel(ctx), v, m.State, m.UpdatedAt)
		if to == store.StateRunning {
			v.touch(e.now())
		}
		v.setRunning(to == store.StateRunning)
	}
	v.notify()
	return m, err
}

func (v *vmState) setRunning(r bool) {
	v.mu.Lock()
	v.running = r
	v.mu.Unlock()
}

func (v *vmState) touch(t time.Time) {
	v.mu.Lock()
	if t.After(v.lastActive) {
		v.lastActive = t
	}
	v.mu.Unlock()
}

// imageDir is where a version's build output and template pointer live.
func (e *Engine) imageDir(account, image, version string) string {
	return ImageDir(e.cfg.DataDir, account, image, version)
}

// ImageDir is imageDir for the data directory dataDir, for tools that
// check an engine's files from outside (the soak's leak count).
func ImageDir(dataDir, account, image, version string) string {
	return filepath.Join(dataDir, "images", safe(account), safe(image), safe(version))
}

// safe keeps a path element inside its parent whatever the name holds.
func safe(s string) string {
	s = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '_'
	}, s)
	if s == "" || s == "." || s == ".." {
		s = "_" + s
	}
	return s
}

const templatePointer = "template"

// TemplateFor returns the template directory of an image version, as
// recorded by a successful build (or SetTemplate).
func (e *Engine) TemplateFor(account, image, version string) (string, error) {
	b, err := os.ReadFile(filepath.Join(e.imageDir(account, image, version), templatePointer))
	if err != nil {
		return "", fmt.Errorf("image %s version %s has no snapshot template on this host: %w", image, version, errdefs.ErrNotFound)
	}
	return strings.TrimSpace(string(b)), nil
}

// SetTemplate records dir as the template of an image version (the build
// does it; tests and imports can too).
func (e *Engine) SetTemplate(account, image, version, dir string) error {
	d := e.imageDir(account, image, version)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return err
	}
	tmp := filepath.Join(d, templatePointer+".tmp")
	if err := os.WriteFile(tmp, []byte(dir+"\n"), 0o600); err != nil {
		return err
	}
	if err := syncPath(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(d, templatePointer)); err != nil {
		return err
	}
	return syncPath(d)
}

// hooks returns the microVM hooks and port of the version a VM runs:
// from the record (RunMicrovm copies them), or, for a record older than
// that copy, from the version through the control plane.
func (e *Engine) hooks(ctx context.Context, m store.Microvm) (*store.MicrovmHooks, int) {
	h := m.Hooks
	if h == nil {
		vh, _, err := e.cfg.Control.LegacyVersionSettings(ctx, m.Account, m.ImageName, m.ImageVersion)
		if err != nil || vh == nil {
			return nil, DefaultHooksPort
		}
		h = vh
	}
	port := DefaultHooksPort
	if p := h.Port; p != nil && *p > 0 && *p < 65536 {
		port = int(*p)
	}
	return h.MicrovmHooks, port
}

func hookTimeout(p *int64) time.Duration {
	if p != nil && *p > 0 {
		return time.Duration(*p) * time.Second
	}
	return defaultHookTimeout
}

// callHook POSTs body to a hook path inside the guest through the agent.
// A non-2xx answer is an error.
func (e *Engine) callHook(ctx context.Context, id string, port int, path string, body []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout+5*time.Second)
	defer cancel()
	a, err := e.cfg.Driver.Agent(ctx, id)
	if err != nil {
		metrics.HookFailures.WithLabelValues(hookName(path)).Inc()
		return fmt.Errorf("hook %s: %w", path, err)
	}
	code, resp, err := a.HTTP(ctx, port, "POST", path, body, timeout)
	if err != nil {
		metrics.HookFailures.WithLabelValues(hookName(path)).Inc()
		return fmt.Errorf("hook %s: %w", path, err)
	}
	if code < 200 || code > 299 {
		metrics.HookFailures.WithLabelValues(hookName(path)).Inc()
		if len(resp) > 200 {
			resp = resp[:200]
		}
		return fmt.Errorf("hook %s answered %d: %s", path, code, strings.TrimSpace(string(resp)))
	}
	return nil
}

// hookName is the metrics label of a hook path (its last element).
func hookName(path string) string { return path[strings.LastIndexByte(path, '/')+1:] }

// StartMicrovm implements lifecycle.Backend. The VM network is made before it
// returns (a few netlink calls), so that the proxy can route to the VM
// as soon as the record exists; the clone runs on its own goroutine.
func (e *Engine) StartMicrovm(ctx context.Context, m store.Microvm) error {
	if err := e.reserve(m.ID, memoryOf(m)); err != nil {
		return err
	}
	v := e.state(m)
	nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := e.ensureNet(nctx, v, e.poolTemplate(m)); err != nil {
		e.removeVM(v)
		e.forget(v)
		return err
	}
	go e.start(v, m)
	return nil
}

// poolTemplate is the template microVM m will be cloned from, when the
// driver starts clone processes ahead: its network is then made in such a
// process's namespace, around its TAP, instead of the TAP being moved in
// during the clone (a move waits for RCU grace periods). "" when not.
func (e *Engine) poolTemplate(m store.Microvm) string {
	if _, ok := e.cfg.Driver.(vmm.PoolReserver); !ok {
		return ""
	}
	tmpl, err := e.TemplateFor(m.Account, m.ImageName, m.ImageVersion)
	if err != nil {
		return "" // start reports it
	}
	return tmpl
}

// ensureNet makes (or finds) the VM's namespace, DNS forwarder and
// metadata service, whichever is missing; tmpl as for poolTemplate. On
// error the caller removes what there is (removeVM).
func (e *Engine) ensureNet(ctx context.Context, v *vmState, tmpl string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.g != nil {
		return v.g.Ensure(ctx)
	}
	// The mark comes first: a network this data directory may own must be
	// findable by the next Recover even if kiln dies now.
	if err := e.markNet(v.id, true); err != nil {
		return fmt.Errorf("recording the microvm network: %w", err)
	}
	cfg := e.guestConfig(v)
	cfg.Template, cfg.Adopt = tmpl, true
	g, err := guestvm.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("setting up the microvm network: %w", err)
	}
	g.AdoptVM()
	v.g = g
	return nil
}

// guestConfig is what surrounds microVM v's VM. The driver's VM of v's id
// is always v's (guestvm.VM.AdoptVM): whatever made it, removeVM ends it.
func (e *Engine) guestConfig(v *vmState) guestvm.Config {
	return guestvm.Config{ID: v.id, Driver: e.cfg.Driver,
		Net:       netns.Config{Egress: v.egress, Pool: e.cfg.NetPool, ExtraDeny: e.cfg.ExtraDeny},
		Upstreams: e.cfg.DNSUpstreams, OnAnswer: e.learnAddrs(v),
		Services: []guestvm.Service{{Name: "metadata service", Start: func(ctx context.Context, n *netns.Net) (io.Closer, error) {
			srv, err := e.startIMDS(ctx, v, n)
			switch {
			case err != nil && v.role != "":
				return nil, err
			case err != nil:
				// Without a role the service only ever answers 404: a VM
				// is not worth ending for it (an adopted VM whose
				// namespace predates it, or whose old listener is still
				// closing). The next ensureNet tries again.
				e.log.Warn("metadata service not started; the microvm has no execution role", "microvm", v.id, "err", err)
				return nil, nil
			}
			return srv, nil
		}}},
	}
}

// guest is v's guestvm.VM (nil if it has none).
func (v *vmState) guest() *guestvm.VM {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.g
}

func (e *Engine) start(v *vmState, m store.Microvm) {
	v.op.Lock()
	defer v.op.Unlock()
	ctx, cancel := context.WithTimeout(v.ctx, e.cfg.StartTimeout)
	defer cancel()
	log := e.log.With("microvm", v.id)
	if ctx.Err() != nil {
		return // terminated before it started
	}
	fail := func(reason string, err error) {
		if v.ctx.Err() != nil {
			return // terminate owns the clean-up and the final state
		}
		log.Warn("microvm start failed", "err", err)
		e.removeVM(v)
		e.report(ctx, v, []store.MicrovmState{store.StatePending}, store.StateTerminated, reason+": "+err.Error())
		e.forget(v)
	}
	tmpl, err := e.resolveTemplate(ctx, m.Account, m.ImageName, m.ImageVersion)
	if err != nil {
		fail("StartFailed", err)
		return
	}
	start := time.Now()
	info, err := e.cfg.Driver.Inspect(ctx, v.id)
	if err != nil || info.State != vmm.StateRunning {
		if err == nil {
			e.cfg.Driver.Terminate(ctx, v.id) // a leftover of an interrupted start
		}
		cloneStart := time.Now()
		g := v.guest()
		if g == nil {
			fail("StartFailed", errors.New("the microvm network is gone"))
			return
		}
		if _, err = g.Clone(ctx, vmm.CloneSpec{Template: tmpl}); err != nil {
			fail("StartFailed", err)
			return
		}
		metrics.Since(metrics.Clone, cloneStart)
	}
	hooks, port := e.hooks(ctx, m)
	if hooks != nil && hooks.Run == "ENABLED" {
		if err := e.callHook(ctx, v.id, port, HookRun, []byte(m.RunHookPayload), hookTimeout(hooks.RunTimeoutInSeconds)); err != nil {
			fail("RunHookFailed", err)
			return
		}
	}
	// Observed before the record changes: whoever sees the new state
	// sees the sample too.
	if !m.StartedAt.IsZero() {
		metrics.Since(metrics.RunToRunning, m.StartedAt)
	}
	if _, err := e.report(ctx, v, []store.MicrovmState{store.StatePending}, store.StateRunning, ""); err != nil {
		log.Info("microvm left PENDING while starting", "err", err)
		return
	}
	e.pumpLogs(ctx, v.id)
	log.Info("microvm running", "took", time.Since(start).Round(time.Millisecond))
}

// removeVM terminates v's VM and removes its network, metadata service
// and DNS forwarder, whichever of them exist.
func (e *Engine) removeVM(v *vmState) {
	v.mu.Lock()
	g := v.g
	v.g = nil
	v.mu.Unlock()
	var err error
	if g != nil {
		err = g.Close()
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), guestvm.CloseTimeout)
		err = guestvm.Remove(ctx, e.cfg.Driver, v.id)
		cancel()
	}
	if err != nil {
		e.log.Warn("removing microvm", "microvm", v.id, "err", err)
	}
	// A network that may still be there stays marked: Recover and the
	// garbage collector remove it.
	if !guestvm.Failed(err, guestvm.StepNetwork) {
		e.markNet(v.id, false)
	}
}

// markNet records (or forgets) that this data directory owns the network
// of microVM id. Network namespaces are host-wide; without the record, a
// kiln server would take another server's networks for its own leftovers.
func (e *Engine) markNet(id string, owned bool) error {
	p := filepath.Join(e.cfg.DataDir, "net", id)
	if !owned {
		return os.Remove(p)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	return os.WriteFile(p, nil, 0o600)
}

// ownsNet reports whether this data directory created id's network.
func (e *Engine) ownsNet(id string) bool {
	_, err := os.Stat(filepath.Join(e.cfg.DataDir, "net", id))
	return err == nil
}

// ownsVM reports whether VM id, if no record claims it, is this engine's
// leftover to remove: on a driver of its own every VM is (build VMs
// included); on a shared one only a microVM's whose network this data
// directory made (markNet comes before the VM is made).
func (e *Engine) ownsVM(id string) bool {
	return !e.cfg.SharedDriver || (strings.HasPrefix(id, VMPrefix) && e.ownsNet(id))
}

// SuspendMicrovm implements lifecycle.Backend.
func (e *Engine) SuspendMicrovm(ctx context.Context, m store.Microvm) error {
	v := e.state(m)
	// Before anything pauses the VM: from here on the proxy asks
	// EnsureRunning (which reads SUSPENDING and waits) instead of taking
	// RunningNow's word. A suspend that ends RUNNING reports it again.
	v.setRunning(false)
	go e.suspend(v, m)
	return nil
}

func (e *Engine) suspend(v *vmState, m store.Microvm) {
	v.op.Lock()
	defer v.op.Unlock()
	if v.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(v.ctx, 2*time.Minute)
	defer cancel()
	log := e.log.With("microvm", v.id)
	start := time.Now()
	if isIdleSuspend(m.StateReason) && v.busy() {
		// A request arrived between the idle check and now: it was let
		// through as RUNNING, so the VM must stay up.
		e.report(ctx, v, []store.MicrovmState{store.StateSuspending}, store.StateRunning, "")
		return
	}
	info, err := e.cfg.Driver.Inspect(ctx, v.id)
	if err == nil && info.State == vmm.StateRunning {
		hooks, port := e.hooks(ctx, m)
		if hooks != nil && hooks.Suspend == "ENABLED" {
			// A failing suspend hook is logged, not fatal: the app asked to
			// be told, not to veto (AWS suspends after the hook's timeout).
			if err := e.callHook(ctx, v.id, port, HookSuspend, nil, hookTimeout(hooks.SuspendTimeoutInSeconds)); err != nil {
				log.Warn("suspend hook", "err", err)
			}
		}
		err = e.cfg.Driver.Suspend(ctx, v.id)
	} else if err == nil && info.State != vmm.StateSuspended {
		err = fmt.Errorf("vm is %s: %w", info.State, errdefs.ErrConflict)
	}
	if err != nil {
		if v.ctx.Err() != nil {
			return
		}
		log.Warn("suspend failed", "err", err)
		e.report(ctx, v, []store.MicrovmState{store.StateSuspending}, store.StateRunning, "SuspendFailed: "+err.Error())
		return
	}
	metrics.Since(metrics.Suspend, start)
	if _, err := e.report(ctx, v, []store.MicrovmState{store.StateSuspending}, store.StateSuspended, m.StateReason); err != nil {
		log.Info("microvm left SUSPENDING while suspending", "err", err)
		return
	}
	log.Info("microvm suspended", "took", time.Since(start).Round(time.Millisecond))
}

// ResumeMicrovm implements lifecycle.Backend.
func (e *Engine) ResumeMicrovm(ctx context.Context, m store.Microvm) error {
	if err := e.reserve(m.ID, memoryOf(m)); err != nil {
		return err
	}
	v := e.state(m)
	go e.resume(v, m)
	return nil
}

func (e *Engine) resume(v *vmState, m store.Microvm) {
	v.op.Lock()
	defer v.op.Unlock()
	if v.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(v.ctx, e.cfg.StartTimeout)
	defer cancel()
	log := e.log.With("microvm", v.id)
	start := time.Now()
	if err := e.ensureNet(ctx, v, ""); err != nil {
		e.lose(v, "ResumeFailed: "+err.Error())
		return
	}
	if _, err := e.cfg.Driver.Resume(ctx, v.id); err != nil {
		if v.ctx.Err() != nil {
			return
		}
		log.Warn("resume failed", "err", err)
		e.lose(v, "ResumeFailed: "+err.Error())
		return
	}
	// The guest runs in a new agent session: whoever follows its
	// processes (envd) adopts them now, before the resume hook, while
	// the agent keeps only a bounded part of their output.
	v.notify()
	hooks, port := e.hooks(ctx, m)
	if hooks != nil && hooks.Resume == "ENABLED" {
		if err := e.callHook(ctx, v.id, port, HookResume, nil, hookTimeout(hooks.ResumeTimeoutInSeconds)); err != nil {
			log.Warn("resume hook", "err", err)
		}
	}
	metrics.Since(metrics.Resume, start)
	if _, err := e.report(ctx, v, []store.MicrovmState{store.StateSuspended}, store.StateRunning, ""); err != nil {
		log.Info("microvm left SUSPENDED while resuming", "err", err)
		return
	}
	e.pumpLogs(ctx, v.id)
	log.Info("microvm resumed", "took", time.Since(start).Round(time.Millisecond))
}

// lose ends a VM the engine cannot run any more (its process died, its
// files are gone) and records why. Called with v.op held or not.
func (e *Engine) lose(v *vmState, reason string) {
	ctx := context.WithoutCancel(e.ctx)
	e.removeVM(v)
	e.report(ctx, v, nil, store.StateTerminated, reason)
	e.forget(v)
	e.gcTemplate(ctx, v.account, v.image, v.version)
}

// TerminateMicrovm implements lifecycle.Backend.
func (e *Engine) TerminateMicrovm(ctx context.Context, m store.Microvm) error {
	v := e.state(m)
	v.cancel() // abandon a start or resume in flight
	go e.terminate(v, m)
	return nil
}

func (e *Engine) terminate(v *vmState, m store.Microvm) {
	v.op.Lock()
	defer v.op.Unlock()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(e.ctx), 2*time.Minute)
	defer cancel()
	log := e.log.With("microvm", v.id)
	if info, err := e.cfg.Driver.Inspect(ctx, v.id); err == nil && info.State == vmm.StateRunning {
		hooks, port := e.hooks(ctx, m)
		if hooks != nil && hooks.Terminate == "ENABLED" {
			if err := e.callHook(ctx, v.id, port, HookTerminate, nil, hookTimeout(hooks.TerminateTimeoutInSeconds)); err != nil {
				log.Warn("terminate hook", "err", err)
			}
		}
	}
	e.removeVM(v)
	reason := m.StateReason
	if _, err := e.report(ctx, v, nil, store.StateTerminated, reason); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		log.Warn("recording termination", "err", err)
	}
	e.forget(v)
	log.Info("microvm terminated", "reason", reason)
	e.gcTemplate(ctx, m.Account, m.ImageName, m.ImageVersion)
}

// handleEvent reacts to a VM the driver saw die unasked.
func (e *Engine) handleEvent(ev vmm.Event) {
	v := e.lookup(ev.ID)
	if v == nil || ev.State == vmm.StateRunning {
		return
	}
	go func() {
		v.op.Lock()
		defer v.op.Unlock()
		if v.ctx.Err() != nil {
			return // being terminated anyway
		}
		// The driver reports only exits nobody asked for (not a suspend or
		// terminate), before it has cleaned up: trust the event, unless the
		// VM is suspended by now.
		if info, err := e.cfg.Driver.Inspect(context.Background(), v.id); err == nil && info.State == vmm.StateSuspended {
			return
		}
		reason := ev.Reason
		if reason == "" {
			reason = "the VM process exited"
		}
		e.log.Warn("microvm died", "microvm", v.id, "reason", reason)
		e.lose(v, "VMExited: "+reason)
	}()
}

// memoryLoop keeps kiln_host_guest_memory_committed_bytes current: the
// guest memory of every VM of the driver that runs (microVMs and build VMs;
// a suspended VM holds no host memory).
func (e *Engine) memoryLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		e.UpdateMemoryMetric(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// UpdateMemoryMetric sets the committed guest memory gauge from the driver.
func (e *Engine) UpdateMemoryMetric(ctx context.Context) {
	infos, err := e.cfg.Driver.List(ctx)
	if err != nil {
		return
	}
	var mib int64
	for _, i := range infos {
		if i.State == vmm.StateRunning {
			mib += int64(i.MemoryMiB)
		}
	}
	metrics.GuestMemoryCommitted.Set(float64(mib << 20))
	_, allowed := e.CommittedMiB()
	metrics.GuestMemoryAllowed.Set(float64(allowed << 20))
}

// Ready reports whether the engine can run microVMs: its driver answers.
func (e *Engine) Ready(ctx context.Context) error {
	if e.ctx.Err() != nil {
		return errors.New("the engine is stopping")
	}
	if _, err := e.cfg.Driver.List(ctx); err != nil {
		return fmt.Errorf("vm driver: %w", err)
	}
	return nil
}
