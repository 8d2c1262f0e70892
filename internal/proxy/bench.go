//go:build linux

package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// BenchOptions sizes Bench. Zero values take the defaults.
type BenchOptions struct {
	Requests    int           // sequential requests per mode and round, for latency (default 1000)
	Concurrency int           // parallel clients per mode, for throughput (default 32)
	Duration    time.Duration // throughput phase per mode and round (default 2s)
	BodySize    int           // response body bytes (default 1024)
	Rounds      int           // rounds of all modes, interleaved; figures are medians (default 5)
	// BackendDelay makes the stand-in app take this long per request, as a
	// real app does; 0 measures the proxy's own cost (CPU-bound loopback).
	BackendDelay time.Duration
	// Nginx is the nginx binary of the peer modes (default: PATH, then
	// /usr/sbin/nginx).
	Nginx string
	// NginxWorkers is nginx's worker_processes (default: the GOMAXPROCS
	// of kiln's proxy, so both may use as many cores).
	NginxWorkers int
	// ProxyCommand, if set, runs kiln's proxy in a process of its own, as
	// nginx runs in its own: argv of a program that calls ServeBenchProxy
	// on its stdin and stdout. Empty: in this process (tests).
	ProxyCommand []string
	// BaselineCommand, if set, runs a second kiln proxy the same way (for
	// example an older build's `kiln bench proxy-serve`) as the modes
	// "kiln-baseline": before and after a change, measured in one run.
	BaselineCommand []string
}

// BenchStats is one mode's result: medians over the rounds.
type BenchStats struct {
	Mode   string // e.g. "kiln https h2"
	Server string // direct, direct-tls, kiln, kiln-baseline or nginx
	Proto  string // http/1.1 or h2
	TLS    string // what the client negotiated, "" for plain HTTP
	// P50 and P99 of sequential requests; Added* are the medians of the
	// per-round differences to the direct mode of the same round.
	P50, P99           time.Duration
	AddedP50, AddedP99 time.Duration
	RPS                float64
	RPSRounds          []float64
	// CPUPerRequest is the server process's CPU time per request in the
	// throughput phase (median over rounds; 0 if not measured).
	CPUPerRequest time.Duration
	// CPUUser and CPUSys are the server's user and system CPU time over
	// all rounds' throughput phases divided by all their requests: steadier
	// than the per-round median on a shared host (a round's figure moved
	// ±15% between runs), and they show whose code the time is in.
	CPUUser, CPUSys time.Duration
	Errors          int64
}

// BenchPair is kiln against nginx for one client protocol.
type BenchPair struct {
	Proto          string
	RPSRatio       float64       // kiln req/s ÷ nginx req/s
	AddedP50Delta  time.Duration // kiln's added p50 − nginx's
	RPSTargetMet   bool          // kiln req/s ≥ nginx's
	P50TargetMet   bool          // kiln's added p50 ≤ nginx's
	KilnRPS        float64
	NginxRPS       float64
	KilnAddedP50   time.Duration
	NginxAddedP50  time.Duration
	KilnAddedP99   time.Duration
	NginxAddedP99  time.Duration
	KilnCPU        time.Duration // per request
	NginxCPU       time.Duration
	KilnUser       time.Duration // per request, over all rounds
	NginxUser      time.Duration
	ErrorsObserved bool
}

// BenchResult compares, on loopback, direct requests to a plain HTTP
// backend with the same requests through kiln's endpoint proxy (TLS
// terminated, token checked, Backend consulted) and through nginx as a
// TLS reverse proxy, from one Go client, modes interleaved per round.
type BenchResult struct {
	Opts         BenchOptions
	Modes        []BenchStats // [0] is direct
	Pairs        []BenchPair
	GOMAXPROCS   int    // kiln proxy's
	NginxWorkers int    // nginx's worker_processes
	NginxVersion string // nginx -v
	ProxyProcess bool   // kiln's proxy ran in a process of its own
	LoadBefore   string // /proc/loadavg at the start
	LoadAfter    string // and at the end
}

func (r BenchResult) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "proxy benchmark: %d rounds; per mode and round %d sequential requests, %d clients for %s; %d-byte bodies, app delay %s\n",
		r.Opts.Rounds, r.Opts.Requests, r.Opts.Concurrency, r.Opts.Duration, r.Opts.BodySize, r.Opts.BackendDelay)
	fmt.Fprintf(&b, "kiln proxy GOMAXPROCS %d (own process: %v), nginx %s worker_processes %d; load average before %s, after %s\n",
		r.GOMAXPROCS, r.ProxyProcess, r.NginxVersion, r.NginxWorkers, r.LoadBefore, r.LoadAfter)
	fmt.Fprintf(&b, "%-29s %9s %9s %10s %10s %9s %8s %13s %7s  %s\n", "mode", "p50", "p99", "added p50", "added p99", "req/s", "cpu/req", "user+sys/req", "errors", "tls")
	us := func(d time.Duration) string { return d.Round(time.Microsecond).String() }
	for _, m := range r.Modes {
		cpu := "-"
		if m.CPUPerRequest > 0 {
			cpu = fmt.Sprintf("%.1fµs", float64(m.CPUPerRequest.Nanoseconds())/1000)
		}
		split := "-"
		if m.CPUUser+m.CPUSys > 0 {
			split = fmt.Sprintf("%.1f+%.1fµs", float64(m.CPUUser.Nanoseconds())/1000, float64(m.CPUSys.Nanoseconds())/1000)
		}
		fmt.Fprintf(&b, "%-29s %9s %9s %10s %10s %9.0f %8s %13s %7d  %s\n", m.Mode, us(m.P50), us(m.P99), us(m.AddedP50), us(m.AddedP99), m.RPS, cpu, split, m.Errors, m.TLS)
	}
	met := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	for _, p := range r.Pairs {
		fmt.Fprintf(&b, "%s: kiln/nginx throughput %.2f (target >= 1: %s), added p50 kiln %s vs nginx %s (target <=: %s)",
			p.Proto, p.RPSRatio, met(p.RPSTargetMet), us(p.KilnAddedP50), us(p.NginxAddedP50), met(p.P50TargetMet))
		if p.KilnCPU > 0 && p.NginxCPU > 0 {
			fmt.Fprintf(&b, "; CPU per request kiln/nginx %.2f", float64(p.KilnCPU)/float64(p.NginxCPU))
		}
		if p.KilnUser > 0 && p.NginxUser > 0 {
			fmt.Fprintf(&b, ", user CPU %.2f", float64(p.KilnUser)/float64(p.NginxUser))
		}
		b.WriteString("\n")
	}
	return b.String()
}

// JSON is the one-line summary `kiln bench proxy` prints last.
func (r BenchResult) JSON() string {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	type mode struct {
		Mode      string    `json:"mode"`
		Server    string    `json:"server"`
		Proto     string    `json:"proto"`
		TLS       string    `json:"tls,omitempty"`
		P50       float64   `json:"p50_ms"`
		P99       float64   `json:"p99_ms"`
		AddedP50  float64   `json:"added_p50_ms"`
		AddedP99  float64   `json:"added_p99_ms"`
		RPS       float64   `json:"rps"`
		RPSRounds []float64 `json:"rps_rounds"`
		CPU       float64   `json:"cpu_us_per_request,omitempty"`
		CPUUser   float64   `json:"cpu_user_us_per_request,omitempty"`
		CPUSys    float64   `json:"cpu_sys_us_per_request,omitempty"`
		Errors    int64     `json:"errors"`
	}
	type pair struct {
		Proto         string  `json:"proto"`
		RPSRatio      float64 `json:"rps_ratio_kiln_nginx"`
		KilnAddedP50  float64 `json:"kiln_added_p50_ms"`
		NginxAddedP50 float64 `json:"nginx_added_p50_ms"`
		KilnAddedP99  float64 `json:"kiln_added_p99_ms"`
		NginxAddedP99 float64 `json:"nginx_added_p99_ms"`
		CPURatio      float64 `json:"cpu_ratio_kiln_nginx,omitempty"`
		UserRatio     float64 `json:"user_cpu_ratio_kiln_nginx,omitempty"`
		RPSTargetMet  bool    `json:"rps_target_met"`
		P50TargetMet  bool    `json:"p50_target_met"`
		TargetsMet    bool    `json:"targets_met"`
	}
	out := struct {
		Benchmark    string  `json:"benchmark"`
		Rounds       int     `json:"rounds"`
		Requests     int     `json:"requests"`
		Concurrency  int     `json:"concurrency"`
		Seconds      float64 `json:"seconds_per_mode"`
		BodySize     int     `json:"body_size"`
		GOMAXPROCS   int     `json:"kiln_gomaxprocs"`
		NginxWorkers int     `json:"nginx_workers"`
		NginxVersion string  `json:"nginx_version"`
		ProxyProcess bool    `json:"kiln_own_process"`
		LoadBefore   string  `json:"loadavg_before"`
		LoadAfter    string  `json:"loadavg_after"`
		Modes        []mode  `json:"modes"`
		Pairs        []pair  `json:"kiln_vs_nginx"`
	}{Benchmark: "proxy", Rounds: r.Opts.Rounds, Requests: r.Opts.Requests, Concurrency: r.Opts.Concurrency,
		Seconds: r.Opts.Duration.Seconds(), BodySize: r.Opts.BodySize, GOMAXPROCS: r.GOMAXPROCS,
		NginxWorkers: r.NginxWorkers, NginxVersion: r.NginxVersion, ProxyProcess: r.ProxyProcess,
		LoadBefore: r.LoadBefore, LoadAfter: r.LoadAfter}
	round := func(x float64) float64 { return float64(int64(x*100+0.5)) / 100 }
	for _, m := range r.Modes {
		rr := make([]float64, len(m.RPSRounds))
		for i, x := range m.RPSRounds {
			rr[i] = round(x)
		}
		out.Modes = append(out.Modes, mode{Mode: m.Mode, Server: m.Server, Proto: m.Proto, TLS: m.TLS, P50: ms(m.P50), P99: ms(m.P99),
			AddedP50: ms(m.AddedP50), AddedP99: ms(m.AddedP99), RPS: round(m.RPS), RPSRounds: rr, Errors: m.Errors,
			CPU: round(float64(m.CPUPerRequest.Nanoseconds()) / 1000), CPUUser: round(float64(m.CPUUser.Nanoseconds()) / 1000),
			CPUSys: round(float64(m.CPUSys.Nanoseconds()) / 1000)})
	}
	for _, p := range r.Pairs {
		cpuRatio := 0.0
		if p.KilnCPU > 0 && p.NginxCPU > 0 {
			cpuRatio = round(float64(p.KilnCPU) / float64(p.NginxCPU))
		}
		userRatio := 0.0
		if p.KilnUser > 0 && p.NginxUser > 0 {
			userRatio = round(float64(p.KilnUser) / float64(p.NginxUser))
		}
		out.Pairs = append(out.Pairs, pair{CPURatio: cpuRatio, UserRatio: userRatio, Proto: p.Proto, RPSRatio: float64(int64(p.RPSRatio*1000+0.5)) / 1000,
			KilnAddedP50: ms(p.KilnAddedP50), NginxAddedP50: ms(p.NginxAddedP50), KilnAddedP99: ms(p.KilnAddedP99), NginxAddedP99: ms(p.NginxAddedP99),
			RPSTargetMet: p.RPSTargetMet, P50TargetMet: p.P50TargetMet, TargetsMet: p.RPSTargetMet && p.P50TargetMet && !p.ErrorsObserved})
	}
	b, _ := json.Marshal(out)
	return string(b)
}

type staticBackend struct{ tgt Target }

func (b staticBackend) Lookup(context.Context, string) (Target, error) { return b.tgt, nil }
func (staticBackend) EnsureRunning(context.Context, string) error      { return nil }
func (staticBackend) ConnOpened(string)                                {}
func (staticBackend) ConnClosed(string)                                {}

// RunningNow: the bench's VM always runs, as the engine reports a
// running VM from memory.
func (staticBackend) RunningNow(string) bool { return true }

// benchProxyConfig is what kiln's proxy needs in the benchmark, also
// when it runs in a child process (one JSON line on its stdin).
type benchProxyConfig struct {
	Domain  string `json:"domain"`
	TLSDir  string `json:"tls_dir"`
	Backend string `json:"backend"`
	Key     []byte `json:"key"`
}

// startBenchProxy runs kiln's endpoint proxy on a loopback port as `kiln
// serve` does (TLS from tlsca, tokens checked, every request to Backend),
// with a backend that always answers "running at Backend".
func startBenchProxy(ctx context.Context, c benchProxyConfig) (string, func(), error) {
	ca, err := tlsca.Open(tlsca.Config{Domain: c.Domain, Dir: c.TLSDir})
	if err != nil {
		return "", nil, err
	}
	signer, err := token.NewSigner(c.Key)
	if err != nil {
		return "", nil, err
	}
	var d net.Dialer
	srv, err := New(Config{Domain: c.Domain, Backend: staticBackend{Target{Addr: netip.MustParseAddr("127.0.0.1"), Ingress: true}},
		Tokens: signer, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, c.Backend)
		}})
	if err != nil {
		return "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	pctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { srv.Serve(pctx, ln, ca.TLSConfig(), time.Second); close(done) }()
	return ln.Addr().String(), func() { stop(); <-done }, nil
}

// ServeBenchProxy is the child side of BenchOptions.ProxyCommand: it reads
// the proxy's configuration as one JSON line from in, starts kiln's proxy,
// writes "ADDR GOMAXPROCS" to out, and serves until in reaches its end
// (the benchmark closed it, or died) or ctx ends.
func ServeBenchProxy(ctx context.Context, in io.Reader, out io.Writer) error {
	br := bufio.NewReader(io.LimitReader(in, 64<<10))
	line, err := br.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("reading the benchmark's proxy configuration: %w", err)
	}
	var c benchProxyConfig
	if err := json.Unmarshal(line, &c); err != nil {
		return fmt.Errorf("parsing the benchmark's proxy configuration: %w", err)
	}
	addr, stop, err := startBenchProxy(ctx, c)
	if err != nil {
		return err
	}
	defer stop()
	if _, err := fmt.Fprintf(out, "%s %d\n", addr, runtime.GOMAXPROCS(0)); err != nil {
		return err
	}
	eof := make(chan struct{})
	go func() { io.Copy(io.Discard, in); close(eof) }()
	select {
	case <-eof:
	case <-ctx.Done():
	}
	return nil
}

// startProxyProcess runs ServeBenchProxy in a child (argv), returning its
// address, GOMAXPROCS, process id and a stop function.
func startProxyProcess(ctx context.Context, argv []string, c benchProxyConfig) (string, int, int, func(), error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return "", 0, 0, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, 0, nil, err
	}
	if err := cmd.Start(); err != nil {
		return "", 0, 0, nil, fmt.Errorf("starting kiln's proxy process: %w", err)
	}
	stop := func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	line, _ := json.Marshal(c)
	if _, err := stdin.Write(append(line, '\n')); err != nil {
		stop()
		return "", 0, 0, nil, fmt.Errorf("configuring kiln's proxy process: %w", err)
	}
	type hello struct {
		addr  string
		procs int
		err   error
	}
	hc := make(chan hello, 1)
	go func() {
		s, err := bufio.NewReader(io.LimitReader(stdout, 4096)).ReadString('\n')
		var h hello
		if err != nil {
			h.err = fmt.Errorf("kiln's proxy process did not start: %w", err)
		} else if f := strings.Fields(s); len(f) != 2 {
			h.err = fmt.Errorf("kiln's proxy process said %q, want ADDR GOMAXPROCS", s)
		} else {
			h.addr = f[0]
			h.procs, h.err = strconv.Atoi(f[1])
		}
		hc <- h
	}()
	select {
	case h := <-hc:
		if h.err != nil {
			stop()
			return "", 0, 0, nil, h.err
		}
		return h.addr, h.procs, cmd.Process.Pid, stop, nil
	case <-time.After(30 * time.Second):
		stop()
		return "", 0, 0, nil, errors.New("kiln's proxy process did not answer within 30s")
	case <-ctx.Done():
		stop()
		return "", 0, 0, nil, ctx.Err()
	}
}

type benchMode struct {
	name, server, proto string
	client              *http.Client
	url                 string
	hdr                 http.Header
	// pid is the server's process (with its children), whose CPU time the
	// throughput phase counts; 0: not measured (it shares this process).
	pid int
}

// Bench measures kiln's proxy and nginx against a plain backend, all on
// loopback. It is what `kiln bench proxy` prints.
func Bench(ctx context.Context, o BenchOptions) (BenchResult, error) {
	if o.Requests <= 0 {
		o.Requests = 1000
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Duration <= 0 {
		o.Duration = 2 * time.Second
	}
	if o.BodySize <= 0 {
		o.BodySize = 1024
	}
	if o.Rounds <= 0 {
		o.Rounds = 5
	}
	res := BenchResult{Opts: o, LoadBefore: loadAvg()}
	nginxBin, err := nginxBinary(o.Nginx)
	if err != nil {
		return res, err
	}
	if v, err := exec.Command(nginxBin, "-v").CombinedOutput(); err == nil {
		res.NginxVersion = strings.TrimPrefix(strings.TrimSpace(string(v)), "nginx version: ")
	}
	body := []byte(strings.Repeat("k", o.BodySize))
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o.BackendDelay > 0 {
			time.Sleep(o.BackendDelay)
		}
		w.Write(body)
	})}
	go backend.Serve(backendLn)
	defer backend.Close()

	dir, err := os.MkdirTemp("", "kiln-bench-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	const dom = "bench.localhost"
	tlsDir := filepath.Join(dir, "tls")
	ca, err := tlsca.Open(tlsca.Config{Domain: dom, Dir: tlsDir})
	if err != nil {
		return res, err
	}
	// The same app behind its own TLS: what TLS alone costs this client.
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	backendTLS := &http.Server{Handler: backend.Handler}
	go backendTLS.Serve(tls.NewListener(tlsLn, ca.TLSConfig()))
	defer backendTLS.Close()

	key := make([]byte, 32)
	rand.Read(key)
	signer, _ := token.NewSigner(key)
	tok, _, err := signer.Mint("bench", "vm", token.KindEndpoint, []token.PortRange{token.Port(DefaultPort)}, 10*time.Minute)
	if err != nil {
		return res, err
	}
	pc := benchProxyConfig{Domain: dom, TLSDir: tlsDir, Backend: backendLn.Addr().String(), Key: key}
	var proxyAddr string
	var stopProxy func()
	var proxyPid int
	if len(o.ProxyCommand) > 0 {
		proxyAddr, res.GOMAXPROCS, proxyPid, stopProxy, err = startProxyProcess(ctx, o.ProxyCommand, pc)
		res.ProxyProcess = true
	} else {
		proxyAddr, stopProxy, err = startBenchProxy(ctx, pc)
		res.GOMAXPROCS = runtime.GOMAXPROCS(0)
	}
	if err != nil {
		return res, err
	}
	defer stopProxy()
	var baseAddr string
	var basePid int
	if len(o.BaselineCommand) > 0 {
		var stopBase func()
		baseAddr, _, basePid, stopBase, err = startProxyProcess(ctx, o.BaselineCommand, pc)
		if err != nil {
			return res, fmt.Errorf("baseline: %w", err)
		}
		defer stopBase()
	}

	// nginx serves the same chain kiln serves (leaf, then CA) with the
	// same P-256 key.
	chain := filepath.Join(dir, "chain.pem")
	leafPEM, err1 := os.ReadFile(filepath.Join(tlsDir, "leaf.pem"))
	caPEM, err2 := os.ReadFile(filepath.Join(tlsDir, "ca.pem"))
	if err := errors.Join(err1, err2); err != nil {
		return res, err
	}
	if err := os.WriteFile(chain, append(leafPEM, caPEM...), 0o644); err != nil {
		return res, err
	}
	res.NginxWorkers = o.NginxWorkers
	if res.NginxWorkers <= 0 {
		res.NginxWorkers = res.GOMAXPROCS
	}
	ngDir := filepath.Join(dir, "nginx")
	if err := os.Mkdir(ngDir, 0o700); err != nil {
		return res, err
	}
	ng, err := startNginx(ctx, nginxBin, ngDir, backendLn.Addr().String(), chain, filepath.Join(tlsDir, "leaf.key"), res.NginxWorkers)
	if err != nil {
		return res, err
	}
	defer ng.stop()

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CAPEM())
	var d net.Dialer
	viaTLS := func(addr string, h2 bool) *http.Client {
		// X25519 for every mode: Go would offer a post-quantum hybrid that
		// kiln accepts and Debian's OpenSSL 3.0 does not, and the handshake
		// is not what is measured here.
		tc := &tls.Config{RootCAs: roots, CurvePreferences: []tls.CurveID{tls.X25519}}
		if !h2 {
			tc.NextProtos = []string{"http/1.1"}
		}
		return &http.Client{Transport: &http.Transport{
			TLSClientConfig: tc, ForceAttemptHTTP2: h2, MaxIdleConnsPerHost: o.Concurrency, DisableCompression: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return d.DialContext(ctx, network, addr)
			}}}
	}
	url := "https://vm." + dom + "/"
	auth := http.Header{HeaderAuth: {tok}}
	modes := []benchMode{
		{"direct http/1.1", "direct", "http/1.1", &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: o.Concurrency, DisableCompression: true}},
			"http://" + backendLn.Addr().String() + "/", nil, 0},
		{"direct https http/1.1", "direct-tls", "http/1.1", viaTLS(tlsLn.Addr().String(), false), url, nil, 0},
		{"kiln https http/1.1", "kiln", "http/1.1", viaTLS(proxyAddr, false), url, auth, proxyPid},
		{"nginx https http/1.1", "nginx", "http/1.1", viaTLS(ng.addr, false), url, auth, ng.cmd.Process.Pid},
		{"kiln https h2", "kiln", "h2", viaTLS(proxyAddr, true), url, auth, proxyPid},
		{"nginx https h2", "nginx", "h2", viaTLS(ng.addr, true), url, auth, ng.cmd.Process.Pid},
	}
	if baseAddr != "" {
		modes = append(modes,
			benchMode{"kiln-baseline https http/1.1", "kiln-baseline", "http/1.1", viaTLS(baseAddr, false), url, auth, basePid},
			benchMode{"kiln-baseline https h2", "kiln-baseline", "h2", viaTLS(baseAddr, true), url, auth, basePid})
	}
	samples := make([][]benchSample, len(modes))
	stats := make([]BenchStats, len(modes))
	for i, m := range modes {
		stats[i] = BenchStats{Mode: m.name, Server: m.server, Proto: m.proto}
	}
	// Rounds rotate the order, so no mode always runs first or right
	// after the most expensive one; the figures are medians over rounds.
	for r := 0; r < o.Rounds; r++ {
		lat, err := benchLatency(ctx, modes, r, o, stats)
		if err != nil {
			return res, err
		}
		for k := range modes {
			i := (k + r) % len(modes)
			s, err := benchThroughput(ctx, modes[i], o, &stats[i])
			if err != nil {
				return res, err
			}
			s.p50, s.p99 = lat[i].p50, lat[i].p99
			samples[i] = append(samples[i], s)
		}
	}
	for i := range modes {
		st := &stats[i]
		var p50s, p99s, add50, add99, cpus []time.Duration
		for r, s := range samples[i] {
			if s.cpu > 0 {
				cpus = append(cpus, s.cpu)
			}
			p50s = append(p50s, s.p50)
			p99s = append(p99s, s.p99)
			add50 = append(add50, s.p50-samples[0][r].p50)
			add99 = append(add99, s.p99-samples[0][r].p99)
			st.RPSRounds = append(st.RPSRounds, s.rps)
		}
		st.P50, st.P99, st.AddedP50, st.AddedP99 = median(p50s), median(p99s), median(add50), median(add99)
		st.RPS = median(slices.Clone(st.RPSRounds))
		st.CPUPerRequest = median(cpus)
		var user, sys time.Duration
		var n int64
		for _, s := range samples[i] {
			user, sys, n = user+s.user, sys+s.sys, n+s.n
		}
		if n > 0 {
			st.CPUUser, st.CPUSys = user/time.Duration(n), sys/time.Duration(n)
		}
		modes[i].client.CloseIdleConnections()
	}
	res.Modes = stats
	for _, proto := range []string{"http/1.1", "h2"} {
		var k, n *BenchStats
		for i := range res.Modes {
			if m := &res.Modes[i]; m.Proto == proto && m.Server == "kiln" {
				k = m
			} else if m.Proto == proto && m.Server == "nginx" {
				n = m
			}
		}
		if k == nil || n == nil || n.RPS == 0 {
			continue
		}
		res.Pairs = append(res.Pairs, BenchPair{Proto: proto, RPSRatio: k.RPS / n.RPS, AddedP50Delta: k.AddedP50 - n.AddedP50,
			RPSTargetMet: k.RPS >= n.RPS, P50TargetMet: k.AddedP50 <= n.AddedP50,
			KilnRPS: k.RPS, NginxRPS: n.RPS, KilnAddedP50: k.AddedP50, NginxAddedP50: n.AddedP50,
			KilnAddedP99: k.AddedP99, NginxAddedP99: n.AddedP99, ErrorsObserved: k.Errors+n.Errors > 0,
			KilnCPU: k.CPUPerRequest, NginxCPU: n.CPUPerRequest, KilnUser: k.CPUUser, NginxUser: n.CPUUser})
	}
	res.LoadAfter = loadAvg()
	return res, ctx.Err()
}

// benchDo makes one request of mode m and checks its answer; the first
// one notes the TLS parameters in st.
func benchDo(ctx context.Context, m benchMode, o BenchOptions, st *BenchStats) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", m.url, nil)
	for k, v := range m.hdr {
		req.Header[k] = v
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return err
	}
	n, _ := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || n != int64(o.BodySize) {
		return fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
	}
	if resp.TLS != nil && st.TLS == "" {
		st.TLS = fmt.Sprintf("%s %s %s %s", tls.VersionName(resp.TLS.Version), tls.CipherSuiteName(resp.TLS.CipherSuite),
			resp.TLS.CurveID, resp.TLS.NegotiatedProtocol)
	}
	return nil
}

// benchLatency measures every mode's sequential latency in round r. The
// modes take turns request by request, so a change in the host's load
// during the round falls on all of them alike (a mode after another
// measured over the whole round was up to 2x off on this shared host).
func benchLatency(ctx context.Context, modes []benchMode, r int, o BenchOptions, stats []BenchStats) ([]benchSample, error) {
	// Warm up connections and caches (and note the TLS parameters while
	// only one request runs at a time).
	for i, m := range modes {
		for k := 0; k < 50; k++ {
			if err := benchDo(ctx, m, o, &stats[i]); err != nil {
				return nil, fmt.Errorf("%s warm-up: %w", m.name, err)
			}
		}
	}
	lat := make([][]time.Duration, len(modes))
	for n := 0; n < o.Requests; n++ {
		for k := range modes {
			i := (k + r + n) % len(modes)
			t0 := time.Now()
			if err := benchDo(ctx, modes[i], o, &stats[i]); err != nil {
				stats[i].Errors++
				continue
			}
			lat[i] = append(lat[i], time.Since(t0))
		}
	}
	out := make([]benchSample, len(modes))
	for i, l := range lat {
		slices.Sort(l)
		if len(l) > 0 {
			out[i].p50, out[i].p99 = l[len(l)/2], l[len(l)*99/100]
		}
	}
	return out, ctx.Err()
}

// benchThroughput runs Concurrency clients of mode m for Duration.
func benchThroughput(ctx context.Context, m benchMode, o BenchOptions, st *BenchStats) (s benchSample, err error) {
	do := func() error { return benchDo(ctx, m, o, st) }
	var count, errs atomic.Int64
	user0, sys0, ok0 := processCPU(m.pid)
	deadline := time.Now().Add(o.Duration)
	var wg sync.WaitGroup
	t0 := time.Now()
	for w := 0; w < o.Concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && ctx.Err() == nil {
				if do() != nil {
					errs.Add(1)
				} else {
					count.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	s.rps = float64(count.Load()) / time.Since(t0).Seconds()
	if n := count.Load(); n > 0 && ok0 {
		if user1, sys1, ok1 := processCPU(m.pid); ok1 && user1+sys1 > user0+sys0 {
			s.cpu = (user1 + sys1 - user0 - sys0) / time.Duration(n)
			s.user, s.sys, s.n = user1-user0, sys1-sys0, n
		}
	}
	st.Errors += errs.Load()
	return s, ctx.Err()
}

type benchSample struct {
	p50, p99 time.Duration
	rps      float64
	cpu      time.Duration // server CPU time per request of the throughput phase
	// The server's user and system CPU time in the throughput phase, and
	// its requests.
	user, sys time.Duration
	n         int64
}

// processCPU is the user and system CPU time of pid and its children
// (nginx's workers) so far; ok is false if unknown. Unlike req/s, CPU time per
// request hardly moves with what else the host runs.
func processCPU(pid int) (user, sys time.Duration, ok bool) {
	if pid == 0 {
		return 0, 0, false
	}
	pids := []int{pid}
	for len(pids) > 0 {
		p := pids[0]
		pids = pids[1:]
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			if p == pid {
				return 0, 0, false
			}
			continue
		}
		// Fields after the command (which may hold spaces), from state on:
		// utime and stime are the 12th and 13th.
		i := strings.LastIndexByte(string(b), ')')
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			return 0, 0, false
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		user += time.Duration(ut) * (time.Second / clockTicks)
		sys += time.Duration(st) * (time.Second / clockTicks)
		if c, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p, p)); err == nil {
			for _, x := range strings.Fields(string(c)) {
				if n, err := strconv.Atoi(x); err == nil {
					pids = append(pids, n)
				}
			}
		}
	}
	return user, sys, true
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

func median[T int64 | float64 | time.Duration](xs []T) T {
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	return xs[len(xs)/2]
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
