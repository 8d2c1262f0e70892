//go:build linux

package enginebench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/token"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// EndpointBenchOptions sizes BenchEndpoint. Zero values take the defaults.
type EndpointBenchOptions struct {
	// Driver runs the VMs; Template is a template directory (Driver.
	// Snapshot) whose app answers GET Path on Port with a 2xx.
	Driver   vmm.Driver
	Template string
	// Dir is a scratch directory for the store, CA and token key; it must
	// exist and the caller removes it.
	Dir  string
	Port uint16 // app port (default 8080)
	Path string // default "/"
	// ResumeRuns is the number of timed auto-resumes and of timed engine
	// resumes (default 5, the minimum for a median worth printing).
	ResumeRuns int
	// VMs, Connections and Duration size the load run (defaults 10, 200,
	// 60 s). VMs 0 with Duration < 0 skips the load run.
	VMs         int
	Connections int
	Duration    time.Duration
	Log         *slog.Logger
	// Progress, if set, gets one line per step.
	Progress io.Writer
}

// EndpointBenchResult holds BenchEndpoint's figures.
type EndpointBenchResult struct {
	ResumeRuns int `json:"resume_runs"`
	// AutoResume is the median time from sending a request (new TLS
	// connection) to a SUSPENDED microVM until its whole response arrived.
	AutoResume time.Duration `json:"-"`
	// EngineResume is the median time from ResumeMicrovm (the API call)
	// until the record says RUNNING: the engine's own resume (network,
	// driver resume, resume hook, record).
	EngineResume time.Duration `json:"-"`
	// DriverResume is the median time of Driver.Resume inside the
	// auto-resumes (the VM part alone).
	DriverResume time.Duration `json:"-"`
	// DriverResumeAPI is the median of Driver.Resume inside the engine
	// resumes.
	DriverResumeAPI time.Duration `json:"-"`
	// AfterRunning is the median part of AutoResume after the record said
	// RUNNING: waking the waiting request and the app's answer.
	AfterRunning time.Duration `json:"-"`
	// FirstAfterResume is the median first request (new TLS connection)
	// right after an engine resume reached RUNNING.
	FirstAfterResume time.Duration `json:"-"`
	// Ratio is AutoResume / EngineResume (target <= 1.5). On a busy host
	// resume times swing by 2x between runs, which this ratio of medians
	// of different resumes carries; SameResumeRatio does not.
	Ratio float64 `json:"auto_resume_over_engine_resume"`
	// SameResumeRatio is the median over runs of each auto-resumed
	// request's time over the driver resume it caused: the cost of the
	// auto-resume path around one and the same resume (conservative: the
	// driver's part is smaller than the engine's whole resume).
	SameResumeRatio float64 `json:"auto_resume_over_its_driver_resume"`

	VMs         int              `json:"load_vms"`
	Connections int              `json:"load_connections"`
	Duration    time.Duration    `json:"-"`
	Load        proxy.LoadResult `json:"-"`
}

// JSON is the one-line summary (durations in milliseconds).
func (r EndpointBenchResult) JSON() string {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	type alias EndpointBenchResult
	b, _ := json.Marshal(struct {
		alias
		AutoResume   float64 `json:"auto_resume_ms"`
		EngineResume float64 `json:"engine_resume_ms"`
		DriverResume float64 `json:"driver_resume_auto_ms"`
		DriverAPI    float64 `json:"driver_resume_api_ms"`
		AfterRunning float64 `json:"auto_resume_after_running_ms"`
		FirstAfter   float64 `json:"first_request_after_resume_ms"`
		Duration     float64 `json:"load_seconds"`
		Requests     int64   `json:"load_requests"`
		Failed       int64   `json:"load_failed"`
		RPS          float64 `json:"load_rps"`
		P50          float64 `json:"load_p50_ms"`
		P99          float64 `json:"load_p99_ms"`
		Max          float64 `json:"load_max_ms"`
	}{alias(r), ms(r.AutoResume), ms(r.EngineResume), ms(r.DriverResume), ms(r.DriverResumeAPI), ms(r.AfterRunning), ms(r.FirstAfterResume), r.Duration.Seconds(),
		r.Load.Requests, r.Load.Failed, r.Load.RPS, ms(r.Load.P50), ms(r.Load.P99), ms(r.Load.Max)})
	return string(b)
}

func (r EndpointBenchResult) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "endpoint benchmark (medians of %d runs)\n", r.ResumeRuns)
	fmt.Fprintf(&b, "  %-44s %10s\n", "request to a SUSPENDED microVM → response", r.AutoResume.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10s\n", "  of which after the record said RUNNING", r.AfterRunning.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10s\n", "engine resume (ResumeMicrovm → RUNNING)", r.EngineResume.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10s\n", "  driver resume inside the auto-resumes", r.DriverResume.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10s\n", "  driver resume inside the engine resumes", r.DriverResumeAPI.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10s\n", "first request right after an engine resume", r.FirstAfterResume.Round(time.Millisecond))
	fmt.Fprintf(&b, "  %-44s %10.2f (target <= 1.5)\n", "auto-resume / engine resume", r.Ratio)
	fmt.Fprintf(&b, "  %-44s %10.2f (median of per-run ratios)\n", "auto-resume / the driver resume it caused", r.SameResumeRatio)
	if r.VMs > 0 {
		fmt.Fprintf(&b, "load: %d connections over %d microVMs for %s\n  %s\n", r.Connections, r.VMs, r.Duration, r.Load)
	}
	return b.String()
}

// timedDriver records how long each Resume takes; the rest is the
// wrapped driver's.
type timedDriver struct {
	vmm.Driver
	mu      sync.Mutex
	resumes []time.Duration
}

func (d *timedDriver) Resume(ctx context.Context, id string) (vmm.Info, error) {
	t0 := time.Now()
	info, err := d.Driver.Resume(ctx, id)
	d.mu.Lock()
	d.resumes = append(d.resumes, time.Since(t0))
	d.mu.Unlock()
	return info, err
}

func (d *timedDriver) take() []time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.resumes
	d.resumes = nil
	return r
}

const benchAccount = "000000000000"

// BenchEndpoint runs a kiln server (internal/server: engine, API and
// endpoint proxy with TLS, on loopback) over o.Driver and measures with real microVMs: (a) a request
// to a SUSPENDED microVM with autoResumeEnabled until its response, next
// to the engine's own resume measured in the same run; (b) a load run of
// o.Connections connections spread over o.VMs microVMs for o.Duration,
// whose failures are reported (the target is zero). Every microVM
// and network it made is removed before it returns, also on failure.
func BenchEndpoint(ctx context.Context, o EndpointBenchOptions) (res EndpointBenchResult, err error) {
	if o.Driver == nil || o.Template == "" || o.Dir == "" {
		return res, fmt.Errorf("bench endpoint: driver, template and dir are required")
	}
	if o.Port == 0 {
		o.Port = proxy.DefaultPort
	}
	if o.Path == "" {
		o.Path = "/"
	}
	if o.ResumeRuns <= 0 {
		o.ResumeRuns = 5
	}
	if o.VMs <= 0 && o.Duration >= 0 {
		o.VMs = 10
	}
	if o.Connections <= 0 {
		o.Connections = 200
	}
	if o.Duration == 0 {
		o.Duration = 60 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	progress := func(format string, a ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format+"\n", a...)
		}
	}
	res.ResumeRuns, res.VMs, res.Connections, res.Duration = o.ResumeRuns, o.VMs, o.Connections, o.Duration

	// The server `kiln server` runs, on the caller's driver.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	const domain = "microvm.localhost"
	drv := &timedDriver{Driver: o.Driver}
	s, err := server.New(ctx, server.Options{Backend: "engine", Driver: drv, DataDir: o.Dir, Log: o.Log,
		APIAddr: "127.0.0.1:0", EndpointAddr: "127.0.0.1:0", Domain: domain, Region: "us-east-1",
		EngineConfig: func(c *engine.Config) { c.IdleInterval = time.Second }})
	if err != nil {
		return res, err
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }()
	defer func() { cancel(); <-served }()
	st, eng, srv, signer := s.Store, s.Engine, s.API, s.EndpointSigner
	caPath := filepath.Join(o.Dir, "ca.pem")
	pem, err := os.ReadFile(caPath)
	if err != nil {
		return res, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return res, fmt.Errorf("%s holds no certificate", caPath)
	}

	// The image the microVMs run: the given template, no hooks.
	const imageName = "bench"
	now := time.Now().UTC()
	img := store.Image{Account: benchAccount, Name: imageName, ARN: "arn:aws:lambda:us-east-1:" + benchAccount + ":microvm-image:" + imageName,
		State: store.ImageCreated, LatestVersion: "1", LatestActiveVersion: "1", CreatedAt: now, UpdatedAt: now}
	ver := store.ImageVersion{Account: benchAccount, ImageName: imageName, ImageARN: img.ARN, Version: "1",
		State: store.VersionSuccessful, Status: store.VersionActive, CreatedAt: now, UpdatedAt: now}
	if err := st.CreateImage(ctx, img, ver, nil, nil); err != nil {
		return res, fmt.Errorf("recording the bench image: %w", err)
	}
	if err := eng.SetTemplate(benchAccount, imageName, "1", o.Template); err != nil {
		return res, err
	}

	var ids []string
	defer func() {
		// Terminate through the API so that the engine releases networks
		// and forgets the VMs; then make sure at the driver and netns.
		bg := context.WithoutCancel(ctx)
		for _, id := range ids {
			tctx, cancel := context.WithTimeout(bg, 10*time.Second)
			srv.Terminate(tctx, benchAccount, id, "UserRequested: bench done")
			cancel()
		}
		for _, id := range ids {
			waitState(bg, st, id, store.StateTerminated, 30*time.Second)
			forceTerminate(o.Driver, id, o.Log)
			tctx, cancel := context.WithTimeout(bg, 30*time.Second)
			netns.Teardown(tctx, id)
			cancel()
		}
	}()
	n := max(o.VMs, 1)
	progress("starting %d microVMs", n)
	for i := 0; i < n; i++ {
		id := benchID(i)
		now := time.Now().UTC()
		m := store.Microvm{ID: id, Account: benchAccount, ARN: "arn:aws:lambda:us-east-1:" + benchAccount + ":microvm:" + id,
			State: store.StatePending, ImageName: imageName, ImageVersion: "1", ImageARN: img.ARN,
			IdlePolicy:               &store.IdlePolicy{MaxIdleDurationSeconds: 3600, SuspendedDurationSeconds: 3600, AutoResumeEnabled: true},
			MaximumDurationInSeconds: 3 * 3600, IngressNetworkConnectors: []string{"arn:aws:lambda:us-east-1:aws:network-connector:" + engine.ConnAllIngress},
			StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(3 * time.Hour)}
		if err := st.CreateMicrovm(ctx, m, nil); err != nil {
			return res, fmt.Errorf("recording microvm: %w", err)
		}
		ids = append(ids, id)
		if err := eng.StartMicrovm(ctx, m); err != nil {
			return res, fmt.Errorf("starting microvm: %w", err)
		}
		// One at a time: parallel clones on a small host only queue up.
		if err := waitState(ctx, st, id, store.StateRunning, 2*time.Minute); err != nil {
			return res, err
		}
	}

	tok := func(id string) string {
		t, _, err := signer.Mint(benchAccount, id, token.KindEndpoint, []token.PortRange{token.AllPorts}, time.Hour)
		if err != nil {
			panic(err) // only for an invalid request, which this is not
		}
		return t
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, s.EndpointAddr)
		}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: time.Minute}
	get := func(id string) error {
		return getOnce(ctx, client, "https://"+id+"."+domain+o.Path, tok(id), o.Port)
	}

	// (a) Auto-resume against the engine's resume, alternating on one VM.
	id := ids[0]
	if err := get(id); err != nil {
		return res, fmt.Errorf("first request: %w", err)
	}
	suspend := func() error {
		if err := srv.Suspend(ctx, benchAccount, id, "UserRequested: bench"); err != nil {
			return fmt.Errorf("suspending: %w", err)
		}
		return waitState(ctx, st, id, store.StateSuspended, time.Minute)
	}
	var auto, engine, driver, driverAPI, afterRunning, firstAfter []time.Duration
	oneResume := func() (time.Duration, error) {
		d := drv.take()
		if len(d) != 1 {
			return 0, fmt.Errorf("%d driver resumes, want 1", len(d))
		}
		return d[0], nil
	}
	autoRun := func() error {
		if err := suspend(); err != nil {
			return err
		}
		drv.take()
		tr.CloseIdleConnections() // a new client: TLS handshake included
		t0 := time.Now()
		if err := get(id); err != nil {
			return fmt.Errorf("request to a suspended microvm: %w", err)
		}
		done := time.Now()
		auto = append(auto, done.Sub(t0))
		if m, err := st.GetMicrovm(ctx, benchAccount, id); err == nil && m.State == store.StateRunning &&
			m.UpdatedAt.After(t0) && m.UpdatedAt.Before(done) {
			afterRunning = append(afterRunning, done.Sub(m.UpdatedAt))
		}
		d, err := oneResume()
		if err != nil {
			return err
		}
		driver = append(driver, d)
		return waitState(ctx, st, id, store.StateRunning, time.Minute)
	}
	engineRun := func() error {
		if err := suspend(); err != nil {
			return err
		}
		drv.take()
		t0 := time.Now()
		if err := srv.Resume(ctx, benchAccount, id); err != nil {
			return fmt.Errorf("resuming: %w", err)
		}
		if err := waitState(ctx, st, id, store.StateRunning, time.Minute); err != nil {
			return err
		}
		engine = append(engine, time.Since(t0))
		d, err := oneResume()
		driverAPI = append(driverAPI, d)
		if err != nil {
			return err
		}
		// The first request after an explicit resume: what a resumed
		// guest takes to answer, without the auto-resume path.
		tr.CloseIdleConnections()
		t1 := time.Now()
		if err := get(id); err != nil {
			return fmt.Errorf("request after resume: %w", err)
		}
		firstAfter = append(firstAfter, time.Since(t1))
		return nil
	}
	for i := 0; i < o.ResumeRuns; i++ {
		// Alternate which goes first, so that neither always follows the
		// other's after-effects (page cache, writeback).
		first, second := autoRun, engineRun
		if i%2 == 1 {
			first, second = engineRun, autoRun
		}
		if err := first(); err != nil {
			return res, err
		}
		if err := second(); err != nil {
			return res, err
		}
		progress("run %d: auto-resume request %s (driver resume %s), engine resume %s (driver resume %s)", i+1,
			auto[i].Round(time.Millisecond), driver[i].Round(time.Millisecond), engine[i].Round(time.Millisecond), driverAPI[i].Round(time.Millisecond))
	}
	res.DriverResumeAPI, res.AfterRunning, res.FirstAfterResume = medianDuration(driverAPI), medianDuration(afterRunning), medianDuration(firstAfter)
	res.AutoResume, res.EngineResume, res.DriverResume = medianDuration(auto), medianDuration(engine), medianDuration(driver)
	if res.EngineResume > 0 {
		res.Ratio = float64(res.AutoResume) / float64(res.EngineResume)
	}
	var same []float64
	for i := range auto {
		if driver[i] > 0 {
			same = append(same, float64(auto[i])/float64(driver[i]))
		}
	}
	if len(same) > 0 {
		slices.Sort(same)
		res.SameResumeRatio = same[len(same)/2]
	}

	// (b) Load: every microVM answers first, then Connections clients.
	if o.Duration < 0 {
		return res, nil
	}
	targets := make([]proxy.LoadTarget, 0, len(ids))
	for _, id := range ids {
		if err := get(id); err != nil {
			return res, fmt.Errorf("microvm %s before the load: %w", id, err)
		}
		targets = append(targets, proxy.LoadTarget{URL: "https://" + id + "." + domain + o.Path, Token: tok(id), Port: o.Port})
	}
	progress("load: %d connections over %d microVMs for %s", o.Connections, len(ids), o.Duration)
	res.Load, err = proxy.Load(ctx, proxy.LoadOptions{Targets: targets, Connections: o.Connections, Duration: o.Duration,
		Endpoint: s.EndpointAddr, RootCAs: roots})
	if err != nil {
		return res, fmt.Errorf("load: %w", err)
	}
	return res, nil
}

// forceTerminate ends a VM even when a driver operation on it hangs
// (Terminate waits for the VM's operation lock, and a stuck suspend was
// seen to hold it): after a grace period it kills the VM's process, which
// fails the stuck operation and lets Terminate finish.
func forceTerminate(drv vmm.Driver, id string, log *slog.Logger) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		drv.Terminate(context.Background(), id)
	}()
	select {
	case <-done:
		return
	case <-time.After(30 * time.Second):
	}
	if info, err := drv.Inspect(context.Background(), id); err == nil && info.PID > 0 {
		log.Warn("terminate hangs: killing the vm's process", "microvm", id, "pid", info.PID)
		syscall.Kill(info.PID, syscall.SIGKILL)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		log.Error("microvm could not be terminated", "microvm", id)
	}
}

// benchID names the benchmark's i-th microVM (apart from the tests' ids).
func benchID(i int) string { return fmt.Sprintf("mvm-%08x%04x", os.Getpid(), 0xb000+i) }

func getOnce(ctx context.Context, c *http.Client, url, tok string, port uint16) error {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	req.Header.Set(proxy.HeaderAuth, tok)
	req.Header.Set(proxy.HeaderPort, fmt.Sprint(port))
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d: %.200s", resp.StatusCode, b)
	}
	return nil
}

// waitState polls the record until it reaches want (a short period: the
// figures above include this wait).
func waitState(ctx context.Context, st store.Store, id string, want store.MicrovmState, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		m, err := st.GetMicrovm(ctx, benchAccount, id)
		if err == nil && m.State == want {
			return nil
		}
		if err == nil && want != store.StateTerminated && m.State == store.StateTerminated {
			return fmt.Errorf("microvm %s ended: %s", id, m.StateReason)
		}
		select {
		case <-ctx.Done():
			if err == nil {
				return fmt.Errorf("microvm %s is %s (%s), want %s: %w", id, m.State, m.StateReason, want, ctx.Err())
			}
			return fmt.Errorf("microvm %s: %w", id, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func medianDuration(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
