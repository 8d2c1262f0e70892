//go:build linux

package imagebuild

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Hook paths of the AWS Lambda MicroVMs runtime API, served by the app on
// the hooks port.
const (
	ReadyHookPath    = "/aws/lambda-microvms/runtime/v1/ready"
	ValidateHookPath = "/aws/lambda-microvms/runtime/v1/validate"
	// AppPort is where kiln waits for the app when the ready hook is off.
	AppPort = 8080
	// ReadyCommandLabel is kiln's readiness check by command: an image
	// LABEL whose value is a shell command. Without the ready hook, the
	// builder runs it (/bin/sh -c, as the app's user, in its WORKDIR, with
	// its environment) until it exits 0, instead of waiting for TCP on
	// AppPort. E2B templates' readyCmd maps onto it; any Dockerfile may use
	// it for an app that listens on no port.
	ReadyCommandLabel = "dev.kiln.ready-command"
	// readyCommandTry bounds one run of the ready command.
	readyCommandTry = 30 * time.Second
)

// Defaults for Request fields left zero. AWS documents no default for
// readyTimeoutInSeconds or validateTimeoutInSeconds (the model gives only
// their range, 1-3600; the developer guide asks for explicit values), so
// these are kiln's: long enough for a slow start under TCG, short enough
// that an app that never answers does not hold a build VM for an hour.
// docs/COMPATIBILITY.md ("Hooks") says so.
const (
	DefaultMemoryMiB       = 2048
	DefaultReadyTimeout    = 5 * time.Minute
	DefaultValidateTimeout = 5 * time.Minute
	// hookRetryEvery spaces the calls of a hook that answered 503 ("not
	// yet"): AWS keeps calling /ready and /validate until their timeout.
	hookRetryEvery = 250 * time.Millisecond
)

// MemorySizes are the memory sizes an image may ask for (AWS's sizes).
var MemorySizes = []int{512, 1024, 2048, 4096, 8192}

// MemoryFor is the smallest of MemorySizes that holds minMiB (an image's
// resources.minimumMemoryInMiB).
func MemoryFor(minMiB int64) (int, error) {
	for _, size := range MemorySizes {
		if int64(size) >= minMiB {
			return size, nil
		}
	}
	return 0, fmt.Errorf("minimumMemoryInMiB %d is more than the largest microVM size, %d MiB (sizes: %v): %w",
		minMiB, MemorySizes[len(MemorySizes)-1], MemorySizes, errdefs.ErrInvalid)
}

// Builder turns one image version into a snapshot template. Set Images
// (whose Runner runs RUN steps, normally a *Runner on Driver) and Driver.
type Builder struct {
	Images *image.Builder
	Driver vmm.Driver
	// Source says how code packages are fetched (limits, S3, local paths).
	Source source.Config
	// VCPUs of the image VM; 0 = 1.
	VCPUs int
	// DNSUpstreams override the host's resolvers for image VMs with egress.
	DNSUpstreams []string
	// ExtraDeny is the operator's --deny-cidr for image VMs (see
	// netns.Config.ExtraDeny); set the Runner's too.
	ExtraDeny []netip.Prefix
	// Packages is the package proxy for image VMs with egress (see
	// Runner.Packages); set the Runner's too.
	Packages *pkgproxy.Proxy
	// CacheDir, if set, keeps finished templates by a key of everything
	// they depend on, in a folder per account, so an unchanged rebuild by
	// the same account reuses the snapshot instead of booting and
	// starting the app again. Put it on the file system of the OutDirs
	// (files are hard-linked, within an account only).
	CacheDir string
	// CacheSalt is mixed into template cache keys: set it to something
	// that changes with the guest kernel and agent (e.g. the initramfs
	// hash), so that a rebuild after an upgrade snapshots afresh.
	CacheSalt string
	Logger    *slog.Logger
}

// Hooks are the image's build hooks (AWS: hooks.microvmImageHooks and
// hooks.port).
type Hooks struct {
	// Port of the app's hooks listener in the guest; 0 = 8080.
	Port int
	// Ready: poll POST ReadyHookPath until 200 (503 = not yet) instead of
	// waiting for TCP on port 8080. ReadyTimeout bounds either wait; 0 =
	// DefaultReadyTimeout.
	Ready        bool
	ReadyTimeout time.Duration
	// Validate: after the snapshot, restore it into a fresh VM (as a
	// microVM would run) and POST ValidateHookPath there until it answers
	// 200; 503 (or no answer yet) is retried until ValidateTimeout (0 =
	// DefaultValidateTimeout), any other status fails the version. AWS:
	// "/validate ... After build, on a test MicroVM run from the
	// snapshot"; "return 503 if the application needs more time".
	Validate        bool
	ValidateTimeout time.Duration
}

// Request is one image version to build.
type Request struct {
	// Account owns the version; required. The step cache and the template
	// cache it reads and fills are that account's own: a template (memory
	// snapshot, disks) is never reused, hard-linked or mapped across
	// accounts, and the build log's "cached" and "snapshot reused" lines
	// only ever speak of the account's own earlier builds.
	Account string
	// Source is the code package: a zip or folder path, file://, http(s)://
	// or s3:// URI (see internal/image/source).
	Source    string
	BuildArgs map[string]string
	// Env is the image's environmentVariables, set over the Dockerfile's
	// ENV when the app starts.
	Env map[string]string
	// MemoryMiB is one of MemorySizes; 0 = DefaultMemoryMiB.
	MemoryMiB int
	// VCPUs of the image VM, and so of every microVM cloned from its
	// snapshot; 0 = the Builder's VCPUs.
	VCPUs int
	Hooks Hooks
	// Egress gives the image VM internet access while the app starts.
	Egress bool
	// AllCaps is additionalOsCapabilities [ALL]: the app keeps every
	// capability. Otherwise it runs with the restricted default set
	// (guest.DefaultCapabilities), it and every process it starts.
	AllCaps bool
	// NoCache builds the snapshot afresh even if an identical one exists.
	NoCache bool
	// Log receives the build log as it happens: step headers, RUN output,
	// then the app's own output until the snapshot.
	Log io.Writer
	// OutDir receives root.ext4 and template/. It must not hold either.
	// Both must stay in place as long as the version is used: the
	// template's disk is an overlay on OutDir/root.ext4.
	OutDir string
}

// Timing is how long one phase of a build took.
type Timing struct {
	Phase    string        `json:"phase"`
	Duration time.Duration `json:"duration"`
}

// Result is a built image version.
type Result struct {
	TemplateDir string       `json:"templateDir"`
	RootDisk    string       `json:"rootDisk"`
	Template    vmm.Template `json:"template"`
	Config      image.Config `json:"config"`
	// AppEnv is the environment the app starts with: the image's ENV with
	// the version's environment variables over it.
	AppEnv  []string           `json:"appEnv"`
	Steps   []image.StepReport `json:"steps"`
	Timings []Timing           `json:"timings"`
	// Key identifies everything the template depends on (the template
	// cache's key); CachedTemplate says whether it was reused.
	Key            string   `json:"key"`
	CachedTemplate bool     `json:"cachedTemplate"`
	Warnings       []string `json:"warnings,omitempty"`
}

// Error is a failed build. Reason is what the version records: the step
// that failed, why, and the last lines of the build log.
type Error struct {
	Step   string
	Err    error
	Reason string
}

func (e *Error) Error() string { return e.Step + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Phase names, as Timings and errors report them.
const (
	PhaseRootDisk = "build root disk"
	PhaseBoot     = "boot image vm"
	PhaseStart    = "start app"
	PhaseReady    = "wait until ready"
	PhaseValidate = "validate hook"
	PhaseSnapshot = "snapshot"
	// PhaseReuse replaces boot…snapshot when the template cache has it.
	PhaseReuse = "reuse cached snapshot"
)

func (b *Builder) logger() *slog.Logger {
	if b.Logger != nil {
		return b.Logger
	}
	return slog.Default()
}

// lockedWriter serializes writes from the build and the app's log pump.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Build builds the version. On failure it returns an *Error and leaves
// nothing behind: no VM, no network, no files in OutDir.
func (b *Builder) Build(ctx context.Context, req Request) (res Result, err error) {
	if req.Log == nil {
		req.Log = io.Discard
	}
	tail := image.NewLogTail(20)
	log := &lockedWriter{w: io.MultiWriter(req.Log, tail)}
	step := "check request"
	fail := func(err error) (Result, error) {
		return Result{}, &Error{Step: step, Err: err, Reason: image.FailureReason(&image.StepError{Stage: -1, Instruction: step, Err: err}, tail)}
	}
	if err := b.check(&req); err != nil {
		return fail(err)
	}
	out, err := filepath.Abs(req.OutDir)
	if err != nil {
		return fail(err)
	}
	// QEMU reads the template's memory path inside an option list, where
	// a comma would split it.
	if strings.Contains(out, ",") {
		return fail(fmt.Errorf("output folder %q contains a comma: %w", out, errdefs.ErrInvalid))
	}
	createdOut := false
	if _, err := os.Stat(out); errors.Is(err, os.ErrNotExist) {
		createdOut = true
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return fail(err)
	}
	rootDisk := filepath.Join(out, "root.ext4")
	tmplDir := filepath.Join(out, "template")
	for _, p := range []string{rootDisk, tmplDir} {
		if _, err := os.Lstat(p); err == nil {
			return fail(fmt.Errorf("%s already exists: %w", p, errdefs.ErrConflict))
		}
	}
	defer func() {
		if err == nil {
			return
		}
		os.RemoveAll(tmplDir)
		os.Remove(rootDisk)
		if createdOut {
			os.Remove(out)
		}
	}()

	phase := func(name string, start time.Time) {
		res.Timings = append(res.Timings, Timing{Phase: name, Duration: time.Since(start)})
	}

	// 1. Dockerfile → root disk (RUN steps in build VMs).
	start := time.Now()
	// The package is fetched for the version's account: a kiln-upload://
	// of another account is refused however the request was made.
	src := b.Source
	src.Account = req.Account
	ir, err := b.Images.BuildSource(ctx, req.Source, src, image.Request{Account: req.Account, BuildArgs: req.BuildArgs, Output: rootDisk, Log: log})
	if err != nil {
		var se *image.StepError
		st := PhaseRootDisk
		if errors.As(err, &se) {
			st = se.Instruction
			if se.Line > 0 {
				st = fmt.Sprintf("%s (line %d)", se.Instruction, se.Line)
			}
		}
		return Result{}, &Error{Step: st, Err: err, Reason: image.FailureReason(err, tail)}
	}
	phase(PhaseRootDisk, start)
	res.RootDisk, res.Config, res.Steps, res.Warnings = rootDisk, ir.Config, ir.Steps, ir.Warnings

	argv := ir.Config.Argv()
	env := MergeEnv(ir.Config.Env, req.Env)
	res.AppEnv = env
	res.Key = templateKey(b.CacheSalt+"|"+ir.Key, b.platform(), argv, env, ir.Config.User, ir.Config.WorkingDir, req, b.vcpus(req))
	if b.CacheDir != "" && !req.NoCache {
		start = time.Now()
		t, ok, err := b.fromCache(ctx, req.Account, res.Key, rootDisk, tmplDir)
		if err != nil {
			b.logger().Warn("template cache", "key", res.Key, "err", err)
		}
		if ok {
			fmt.Fprintf(log, "#snapshot reused (template %s)\n", res.Key[:12])
			phase(PhaseReuse, start)
			res.TemplateDir, res.Template, res.CachedTemplate = tmplDir, t, true
			return res, nil
		}
	}

	// 2. Boot the finished image, always with a NIC: the template records
	// it and clones must match.
	step = PhaseStart
	if len(argv) == 0 {
		return fail(fmt.Errorf("the image has no ENTRYPOINT or CMD: %w", image.ErrInvalid))
	}
	step = PhaseBoot
	fmt.Fprintf(log, "#boot image vm (%d MiB, %d vCPUs)\n", req.MemoryMiB, b.vcpus(req))
	start = time.Now()
	g, err := bootVM(ctx, b.Driver, b.logger(), vmSpec{prefix: PrefixImage, rootDisk: rootDisk, memoryMiB: req.MemoryMiB, vcpus: b.vcpus(req), egress: req.Egress, upstreams: b.DNSUpstreams, extraDeny: b.ExtraDeny, packages: b.Packages, account: req.Account})
	if err != nil {
		return fail(err)
	}
	defer g.close()
	phase(PhaseBoot, start)

	// 3. Start the app as the image would run it.
	step = PhaseStart
	fmt.Fprintf(log, "#start app %q as %q in %q\n", argv, orDefault(ir.Config.User, "root"), orDefault(ir.Config.WorkingDir, "/"))
	start = time.Now()
	a, err := b.Driver.Agent(ctx, g.id)
	if err != nil {
		return fail(err)
	}
	pump := newAppLogs()
	pumpDone := make(chan struct{})
	go func() {
		defer close(pumpDone)
		pump.run(a, log)
	}()
	// The pump ends when the VM's agent connection closes (snapshot or
	// terminate); wait for it so nothing writes to Log after Build.
	defer func() {
		g.close()
		select {
		case <-pumpDone:
		case <-time.After(5 * time.Second):
		}
	}()
	p, err := a.Exec(ctx, client.ExecRequest{Argv: argv, Env: env, Cwd: ir.Config.WorkingDir, User: ir.Config.User, Background: true, Caps: AppCaps(req.AllCaps)})
	if err != nil {
		return fail(fmt.Errorf("starting %q: %w", argv[0], err))
	}
	phase(PhaseStart, start)

	// 4. Ready: the ready hook, else TCP on 8080.
	step = PhaseReady
	start = time.Now()
	if err := b.waitReady(ctx, a, p, req.Hooks, appSpec{cfg: ir.Config, env: env}, log); err != nil {
		if exited(p) {
			// The reason ends with the app's last words: let the pump
			// copy its output, which arrives before its exit record.
			pump.waitExit(p.ID(), 2*time.Second)
		}
		return fail(err)
	}
	phase(PhaseReady, start)

	if exited(p) {
		pump.waitExit(p.ID(), 2*time.Second)
		return fail(appExitError(p))
	}

	// 5. Snapshot. The VM is gone afterwards, whatever happens.
	step = PhaseSnapshot
	fmt.Fprintln(log, "#snapshot")
	start = time.Now()
	t, err := b.Driver.Snapshot(ctx, g.id, tmplDir)
	g.VMEnded()
	if err != nil {
		return fail(err)
	}
	phase(PhaseSnapshot, start)

	// 6. Validate, on a VM restored from the snapshot: what the hook
	// checks is what every microVM of this version will start from.
	if req.Hooks.Validate {
		step = PhaseValidate
		start = time.Now()
		if err := b.validate(ctx, req, tmplDir, log); err != nil {
			return fail(err)
		}
		phase(PhaseValidate, start)
	}
	res.TemplateDir, res.Template = tmplDir, t
	if b.CacheDir != "" {
		if err := b.toCache(ctx, req.Account, res.Key, rootDisk, tmplDir); err != nil {
			b.logger().Warn("template cache", "key", res.Key, "err", err)
		}
	}
	return res, nil
}

func (b *Builder) check(req *Request) error {
	if b.Images == nil || b.Driver == nil {
		return errors.New("image builder not configured (Images and Driver are required)")
	}
	if req.Account == "" {
		return fmt.Errorf("build request names no account (caches are per account): %w", errdefs.ErrInvalid)
	}
	if req.OutDir == "" {
		return fmt.Errorf("no output folder: %w", errdefs.ErrInvalid)
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = DefaultMemoryMiB
	}
	ok := false
	for _, m := range MemorySizes {
		ok = ok || m == req.MemoryMiB
	}
	if !ok {
		return fmt.Errorf("memory %d MiB: use one of %v: %w", req.MemoryMiB, MemorySizes, errdefs.ErrInvalid)
	}
	h := &req.Hooks
	if h.Port == 0 {
		h.Port = AppPort
	}
	if h.Port < 1 || h.Port > 65535 {
		return fmt.Errorf("hooks port %d: %w", h.Port, errdefs.ErrInvalid)
	}
	if h.ReadyTimeout <= 0 {
		h.ReadyTimeout = DefaultReadyTimeout
	}
	if h.ValidateTimeout <= 0 {
		h.ValidateTimeout = DefaultValidateTimeout
	}
	return nil
}

func (b *Builder) vcpus(req Request) int {
	if req.VCPUs > 0 {
		return req.VCPUs
	}
	if b.VCPUs > 0 {
		return b.VCPUs
	}
	return 1
}

// platform is the driver's platform when it reports one: a template is
// only reused on the platform it was made on.
func (b *Builder) platform() vmm.Platform {
	if p, ok := b.Driver.(interface{ Platform() vmm.Platform }); ok {
		return p.Platform()
	}
	return vmm.Platform{}
}

// appSpec is how the app runs: its image config and environment.
type appSpec struct {
	cfg image.Config
	env []string
}

// waitReady waits for the ready hook's 200 (or the ready command's exit
// 0, or TCP on 8080), failing early when the app exits.
func (b *Builder) waitReady(ctx context.Context, a *client.Client, p *client.Process, h Hooks, app appSpec, log io.Writer) error {
	rctx, cancel := context.WithTimeout(ctx, h.ReadyTimeout)
	defer cancel()
	if cmd, ok := app.cfg.Labels[ReadyCommandLabel]; ok && !h.Ready {
		return waitReadyCommand(ctx, rctx, a, p, cmd, app, h.ReadyTimeout, log)
	}
	if !h.Ready {
		fmt.Fprintf(log, "#wait until the app accepts TCP on port %d (up to %s)\n", AppPort, h.ReadyTimeout)
		done := make(chan error, 1)
		go func() { done <- a.WaitPort(rctx, AppPort, h.ReadyTimeout) }()
		select {
		case err := <-done:
			if err == nil {
				return nil
			}
			if exited(p) {
				return appExitError(p)
			}
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			return fmt.Errorf("the app did not accept TCP on port %d within %s: %w", AppPort, h.ReadyTimeout, err)
		case <-p.Exited():
			return appExitError(p)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	fmt.Fprintf(log, "#wait for the ready hook: POST %s on port %d (up to %s)\n", ReadyHookPath, h.Port, h.ReadyTimeout)
	last := "no answer"
	for {
		per := 5 * time.Second
		if dl, ok := rctx.Deadline(); ok && time.Until(dl) < per {
			per = time.Until(dl)
		}
		if per > 0 {
			status, body, err := a.HTTP(rctx, h.Port, "POST", ReadyHookPath, nil, per)
			switch {
			case err == nil && status == 200:
				return nil
			case err == nil && status != http.StatusServiceUnavailable:
				// AWS: a /ready answer other than 200 or 503 fails the build.
				return fmt.Errorf("the ready hook answered %d (want 200, or 503 while starting): %s", status, snippet(body))
			case err == nil:
				last = strings.TrimSpace(fmt.Sprintf("answered %d %s", status, snippet(body)))
			case rctx.Err() == nil:
				// A call cut short by the deadline says nothing new.
				last = err.Error()
			}
		}
		select {
		case <-p.Exited():
			return appExitError(p)
		case <-ctx.Done():
			return ctx.Err()
		case <-rctx.Done():
			return fmt.Errorf("the app was not ready within %s (ready hook: %s)", h.ReadyTimeout, last)
		case <-time.After(hookRetryEvery):
		}
	}
}

// waitReadyCommand runs cmd in the guest until it exits 0 (ReadyCommandLabel).
func waitReadyCommand(ctx, rctx context.Context, a *client.Client, p *client.Process, cmd string, app appSpec, timeout time.Duration, log io.Writer) error {
	fmt.Fprintf(log, "#wait until the ready command exits 0: %q (up to %s)\n", cmd, timeout)
	last := "not run"
	for {
		tctx, cancel := context.WithTimeout(rctx, readyCommandTry)
		rp, err := a.Exec(tctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", cmd}, Env: app.env, Cwd: app.cfg.WorkingDir, User: app.cfg.User, Caps: proto.CapsDefault})
		if err == nil {
			// Its output is not kept: the channel is drained so that the
			// agent client never blocks on it.
			go func() {
				for range rp.Output() {
				}
			}()
			code, werr := rp.Wait(tctx)
			switch {
			case werr == nil && code == 0:
				cancel()
				return nil
			case werr == nil:
				last = fmt.Sprintf("exited %d", code)
			default:
				// Sent even if ctx ended, but bounded: an agent that stops
				// answering must not hold the build past its deadline.
				sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				rp.Signal(sctx, 9)
				scancel()
				if rctx.Err() == nil {
					last = fmt.Sprintf("still running after %s", readyCommandTry)
				}
			}
		} else if rctx.Err() == nil {
			// A run cut short by the overall deadline says nothing new.
			last = err.Error()
		}
		cancel()
		select {
		case <-p.Exited():
			return appExitError(p)
		case <-ctx.Done():
			return ctx.Err()
		case <-rctx.Done():
			return fmt.Errorf("the app was not ready within %s (ready command %q: %s)", timeout, cmd, last)
		case <-time.After(hookRetryEvery):
		}
	}
}

// AppCaps is the ExecRequest.Caps of an app: every capability only for
// an image with additionalOsCapabilities [ALL].
func AppCaps(all bool) string {
	if all {
		return proto.CapsAll
	}
	return proto.CapsDefault
}

// validate restores the template into a fresh VM and calls the validate
// hook there until it answers 200: 503 and "not answering yet" are
// retried until the hook's timeout, any other status fails at once.
func (b *Builder) validate(ctx context.Context, req Request, tmplDir string, log io.Writer) error {
	h := req.Hooks
	fmt.Fprintf(log, "#validate: restore the snapshot, then POST %s on port %d (up to %s)\n", ValidateHookPath, h.Port, h.ValidateTimeout)
	g, err := cloneVM(ctx, b.Driver, b.logger(), vmSpec{prefix: PrefixValidate, egress: req.Egress, upstreams: b.DNSUpstreams, extraDeny: b.ExtraDeny, packages: b.Packages, account: req.Account}, tmplDir)
	if err != nil {
		return err
	}
	defer g.close()
	a, err := b.Driver.Agent(ctx, g.id)
	if err != nil {
		return fmt.Errorf("connecting to the validate vm's agent: %w", err)
	}
	vctx, cancel := context.WithTimeout(ctx, h.ValidateTimeout)
	defer cancel()
	last := "no answer"
	for {
		per := 5 * time.Second
		if dl, ok := vctx.Deadline(); ok && time.Until(dl) < per {
			per = time.Until(dl)
		}
		if per > 0 {
			status, body, err := a.HTTP(vctx, h.Port, "POST", ValidateHookPath, nil, per)
			switch {
			case err == nil && status == http.StatusOK:
				return nil
			case err == nil && status != http.StatusServiceUnavailable:
				return fmt.Errorf("the validate hook answered %d (want 200, or 503 while not yet valid): %s", status, snippet(body))
			case err == nil:
				last = strings.TrimSpace(fmt.Sprintf("answered %d %s", status, snippet(body)))
			case vctx.Err() == nil:
				last = err.Error()
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-vctx.Done():
			return fmt.Errorf("the validate hook did not answer 200 within %s (last: %s)", h.ValidateTimeout, last)
		case <-time.After(hookRetryEvery):
		}
	}
}

func exited(p *client.Process) bool {
	select {
	case <-p.Exited():
		return true
	default:
		return false
	}
}

func appExitError(p *client.Process) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	code, err := p.Wait(ctx)
	if err != nil {
		return fmt.Errorf("the app ended before the snapshot: %w", err)
	}
	return fmt.Errorf("the app exited with status %d before the snapshot", code)
}

// appLogs copies the app's output (background workloads report through
// Client.Logs) into the build log until the connection ends, and notes
// which workloads' exits it has seen.
type appLogs struct {
	mu      sync.Mutex
	exited  map[uint64]bool
	changed chan struct{} // closed and replaced when an exit is seen
}

func newAppLogs() *appLogs {
	return &appLogs{exited: map[uint64]bool{}, changed: make(chan struct{})}
}

func (l *appLogs) run(a *client.Client, log io.Writer) {
	for r := range a.Logs() {
		if r.ExitCode != nil {
			fmt.Fprintf(log, "#app exited with status %d\n", *r.ExitCode)
			l.mu.Lock()
			l.exited[r.ExecID] = true
			close(l.changed)
			l.changed = make(chan struct{})
			l.mu.Unlock()
			continue
		}
		_, _ = log.Write(r.Data)
		if r.Dropped > 0 {
			fmt.Fprintf(log, "(%d bytes of app output dropped)\n", r.Dropped)
		}
	}
}

// waitExit waits, at most timeout, until the exit of workload id went
// through the log.
func (l *appLogs) waitExit(id uint64, timeout time.Duration) {
	deadline := time.After(timeout)
	for {
		l.mu.Lock()
		seen, ch := l.exited[id], l.changed
		l.mu.Unlock()
		if seen {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			return
		}
	}
}

// MergeEnv sets the image's environmentVariables over ENV, keeping ENV's
// order and appending new keys sorted.
func MergeEnv(base []string, over map[string]string) []string {
	out := append([]string(nil), base...)
	keys := make([]string, 0, len(over))
	for k := range over {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		found := false
		for i, kv := range out {
			if name, _, _ := strings.Cut(kv, "="); name == k {
				out[i] = k + "=" + over[k]
				found = true
			}
		}
		if !found {
			out = append(out, k+"="+over[k])
		}
	}
	return out
}

func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
