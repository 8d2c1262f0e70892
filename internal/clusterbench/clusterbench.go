//go:build linux

// Package clusterbench is `kiln bench cluster`: kiln as a cluster (a
// private PostgreSQL, `kiln control`, one `kiln node`, `kiln edge`) next
// to a single `kiln server` on SQLite, in one run on one host, each a
// child process of the kiln binary. It builds the same FROM scratch image
// on both, then measures RunMicrovm until RUNNING (control → node over
// gRPC against the server's in-process engine) and HTTPS requests to a
// running microVM (through the edge and the node's endpoint tunnel
// against the server's endpoint proxy), and reports each figure with the
// ratio cluster/server.
package clusterbench

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/soakbench"
	"github.com/kiln-sandbox/kiln/internal/store/postgres/pglocal"
)

// Options configure a run.
type Options struct {
	Kiln      string // the kiln binary (kiln-agent next to it)
	KernelDir string // guest kernel directory
	Dir       string // parent of the scratch directory ("": the system's temp dir)
	// App is a static binary serving HTTP on :8080, the image's app; ""
	// compiles the embedded one (app/main.go) with `go build`.
	App string
	// Runs is how many microVMs each side starts, one at a time, for
	// RunMicrovm → RUNNING.
	Runs int
	// Rounds of Duration each side, alternating, of Clients concurrent
	// keep-alive HTTPS clients to one running microVM.
	Rounds   int
	Duration time.Duration
	Clients  int
	Keep     bool // keep the scratch directory and logs
	// Progress gets a line per phase.
	Progress io.Writer
}

// Result is what the benchmark prints as JSON. Latencies are
// milliseconds; each ratio is cluster / server.
type Result struct {
	Runs     int     `json:"runs"`
	Rounds   int     `json:"rounds"`
	Clients  int     `json:"clients"`
	Duration string  `json:"roundDuration"`
	Accel    string  `json:"accel"`
	Seconds  float64 `json:"seconds"`
	// RunToRunning: RunMicrovm until GetMicrovm says RUNNING (polled
	// every 10 ms), each microVM terminated before the next, after one
	// uncounted warm-up run on each side.
	RunToRunning Compare `json:"runMicrovmToRunning"`
	// Requests: GET / of a running microVM's port 8080 over HTTPS with
	// kept-alive connections; p50, p99 and requests per second are the
	// medians over the rounds.
	RequestP50        Compare `json:"requestP50"`
	RequestP99        Compare `json:"requestP99"`
	RequestsPerSecond Compare `json:"requestsPerSecond"`
	// RequestTotals add up every round: failed requests are not in the
	// figures above; new connections show whether keep-alive held (a
	// handful per round: it did).
	RequestTotals struct {
		Cluster Totals `json:"cluster"`
		Server  Totals `json:"server"`
	} `json:"requestTotals"`
	// Leftovers counts what the run left on the host after its clean-up
	// (QEMU processes, network namespaces, links, cgroups, mounts, VM
	// files): all 0 unless something went wrong.
	Leftovers map[string]soakbench.Leaks `json:"leftovers"`
}

// Compare is one figure on both sides.
type Compare struct {
	Cluster Figure  `json:"cluster"`
	Server  Figure  `json:"server"`
	Ratio   float64 `json:"ratio"` // cluster / server of Median
}

// Totals count a side's requests over every round.
type Totals struct {
	Requests       int `json:"requests"`
	Errors         int `json:"errors"`
	NewConnections int `json:"newConnections"`
}

// Figure is a figure's median over samples, with their spread.
type Figure struct {
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
}

//go:embed app/main.go
var appSource []byte

// side is one of the two kilns under test: its API, its endpoints, the
// image built on it.
type side struct {
	name     string
	api      *awscli.Client
	endpoint string // HOST:PORT of the HTTPS endpoints (edge or server proxy)
	caFile   string // the endpoint CA
	image    string
	ids      []string // every microVM it ran
}

// Run starts both kilns, builds the image on each, measures, and cleans
// up every process, microVM and network namespace, on error too.
func Run(ctx context.Context, o Options) (_ *Result, err error) {
	o = withDefaults(o)
	start := time.Now()
	work, err := os.MkdirTemp(o.Dir, "kclb")
	if err != nil {
		return nil, fmt.Errorf("making the scratch directory: %w", err)
	}
	// Data directories are named by absolute paths everywhere (cgroups,
	// QEMU command lines); socket paths under them must stay short.
	if work, err = filepath.Abs(work); err != nil {
		return nil, err
	}
	if !o.Keep {
		defer os.RemoveAll(work)
	} else {
		fmt.Fprintf(o.Progress, "cluster bench: scratch directory %s (kept)\n", work)
	}
	code := filepath.Join(work, "code.zip")
	if err := codePackage(ctx, work, code, o.App); err != nil {
		return nil, err
	}
	env := &env{o: o, work: work}
	defer func() {
		if cerr := env.cleanUp(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	fmt.Fprintf(o.Progress, "cluster bench: starting PostgreSQL, control, node and edge, and a kiln server\n")
	cl, srv, err := env.start(ctx)
	if err != nil {
		return nil, err
	}
	res := &Result{Runs: o.Runs, Rounds: o.Rounds, Clients: o.Clients, Duration: o.Duration.String(), Accel: accel()}
	for _, s := range []*side{cl, srv} {
		fmt.Fprintf(o.Progress, "cluster bench: building the image on the %s\n", s.name)
		t0 := time.Now()
		if s.image, err = soakbench.BuildImage(ctx, s.api, "bench", code, 10*time.Minute); err != nil {
			return nil, fmt.Errorf("building the image on the %s: %w\n%s", s.name, err, env.tails())
		}
		fmt.Fprintf(o.Progress, "cluster bench: image built on the %s in %v\n", s.name, time.Since(t0).Round(100*time.Millisecond))
	}
	if err := measureRuns(ctx, o, cl, srv, res); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, env.tails())
	}
	if err := measureRequests(ctx, o, cl, srv, res); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, env.tails())
	}
	if err := env.cleanUp(); err != nil {
		return nil, err
	}
	res.Leftovers = env.leftovers
	res.Seconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	for _, l := range env.leftovers {
		if l.Total() > 0 {
			return res, errors.New("the run left processes, networks or files on the host (see leftovers)")
		}
	}
	return res, nil
}

func withDefaults(o Options) Options {
	if o.Runs <= 0 {
		o.Runs = 5
	}
	if o.Rounds <= 0 {
		o.Rounds = 3
	}
	if o.Duration <= 0 {
		o.Duration = 5 * time.Second
	}
	if o.Clients <= 0 {
		o.Clients = 8
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	return o
}

// codePackage writes the image's code package: FROM scratch with app as
// /app, compiling the embedded app when none is given.
func codePackage(ctx context.Context, work, path, app string) error {
	if app == "" {
		src := filepath.Join(work, "appsrc")
		if err := os.MkdirAll(src, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(src, "main.go"), appSource, 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module kilnbenchapp\n\ngo 1.22\n"), 0o644); err != nil {
			return err
		}
		app = filepath.Join(work, "app")
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", app, ".")
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOFLAGS=-mod=mod", "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("compiling the bench app (go build; or pass --app, a static HTTP server on :8080): %w\n%s", err, out)
		}
	}
	return awscli.WriteCodePackage(path, "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n", map[string]string{"app": app})
}

// accel says whether VMs run under KVM or emulated (TCG): the latter is
// slower by an order of magnitude, on both sides alike.
func accel() string {
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		return "kvm"
	}
	return "tcg"
}

// env holds what Run started, for the clean-up.
type env struct {
	o         Options
	work      string
	pg        *pglocal.Cluster
	procs     []*proc // in start order
	server    *soakbench.Server
	serverDir string
	sides     []*side
	leftovers map[string]soakbench.Leaks
	cleaned   bool
}

func (e *env) start(ctx context.Context) (cl, srv *side, err error) {
	if err := pglocal.Available(); err != nil {
		return nil, nil, err
	}
	if e.pg, err = pglocal.Start(ctx); err != nil {
		return nil, nil, fmt.Errorf("starting PostgreSQL: %w", err)
	}
	storeURL, err := e.pg.NewDatabase(ctx)
	if err != nil {
		return nil, nil, err
	}
	caDir := filepath.Join(e.work, "ca")
	if out, err := exec.CommandContext(ctx, e.o.Kiln, "cluster-ca", "init", "--dir", caDir).CombinedOutput(); err != nil {
		return nil, nil, fmt.Errorf("kiln cluster-ca init: %w\n%s", err, out)
	}
	issue := func(role, name string) ([]string, error) {
		out := filepath.Join(e.work, "certs", name)
		if b, err := exec.CommandContext(ctx, e.o.Kiln, "cluster-ca", "issue", "--dir", caDir, "--role", role, "--name", name,
			"--host", "127.0.0.1", "--out", out).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kiln cluster-ca issue --role %s: %w\n%s", role, err, b)
		}
		return []string{"--store", storeURL, "--cluster-ca", filepath.Join(out, "ca.crt"),
			"--cluster-cert", filepath.Join(out, "tls.crt"), "--cluster-key", filepath.Join(out, "tls.key")}, nil
	}
	dataDir := func(name string) (string, error) {
		d := filepath.Join(e.work, name)
		return d, os.MkdirAll(d, 0o700)
	}
	addrs := make([]string, 5)
	for i := range addrs {
		if addrs[i], err = freeAddr(); err != nil {
			return nil, nil, err
		}
	}
	apiAddr, grpcAddr, tunnelAddr, edgeAddr := addrs[0], addrs[1], addrs[2], addrs[3]

	// Control first: it makes the admin key, the sealing key and the
	// token key, which the node and the edge share.
	ctlData, err := dataDir("ctl")
	if err != nil {
		return nil, nil, err
	}
	args, err := issue("control", "control-a")
	if err != nil {
		return nil, nil, err
	}
	if err := e.run(ctx, "control", ctlData, "kiln API serving at ",
		append([]string{"control", "--api-addr", apiAddr, "--metrics-addr", ""}, args...)...); err != nil {
		return nil, nil, err
	}
	nodeData, err := dataDir("node")
	if err != nil {
		return nil, nil, err
	}
	if err := copyShared(ctlData, nodeData); err != nil {
		return nil, nil, err
	}
	if err := os.Symlink(e.o.KernelDir, filepath.Join(nodeData, "kernel")); err != nil {
		return nil, nil, fmt.Errorf("linking the kernel: %w", err)
	}
	if args, err = issue("node", "node-a"); err != nil {
		return nil, nil, err
	}
	if err := e.run(ctx, "node", nodeData, "kiln node node-a serving",
		append([]string{"node", "--node-name", "node-a", "--grpc-addr", grpcAddr, "--tunnel-addr", tunnelAddr, "--metrics-addr", ""}, args...)...); err != nil {
		return nil, nil, err
	}
	edgeData, err := dataDir("edge")
	if err != nil {
		return nil, nil, err
	}
	if args, err = issue("edge", "edge-a"); err != nil {
		return nil, nil, err
	}
	if err := e.run(ctx, "edge", edgeData, "kiln edge serving",
		append([]string{"edge", "--endpoint-addr", edgeAddr, "--metrics-addr", "", "--token-key", filepath.Join(ctlData, "token.key")}, args...)...); err != nil {
		return nil, nil, err
	}
	creds, err := auth.ReadCredentials(filepath.Join(ctlData, "credentials"), "default")
	if err != nil {
		return nil, nil, err
	}
	cl = &side{name: "cluster", api: awscli.NewClient("http://"+apiAddr, "us-east-1", creds), endpoint: edgeAddr,
		caFile: filepath.Join(edgeData, "ca.pem")}

	// The baseline: one kiln server on SQLite, same binary, same host.
	work, data, err := soakbench.ScratchDataDir(e.work, "s", e.o.KernelDir)
	if err != nil {
		return nil, nil, err
	}
	e.serverDir = data
	if e.server, err = soakbench.StartServer(ctx, e.o.Kiln, data, filepath.Join(work, "server.log")); err != nil {
		return nil, nil, err
	}
	if creds, err = auth.ReadCredentials(filepath.Join(data, "credentials"), "default"); err != nil {
		return nil, nil, err
	}
	srv = &side{name: "server", api: awscli.NewClient(e.server.APIURL(), "us-east-1", creds), endpoint: e.server.EndpointAddr(),
		caFile: filepath.Join(data, "ca.pem")}
	for _, s := range []*side{cl, srv} {
		s.api.HTTP.Timeout = 30 * time.Second
	}
	e.sides = []*side{cl, srv}
	return cl, srv, nil
}

func (e *env) run(ctx context.Context, name, data, ready string, args ...string) error {
	p, err := startProc(ctx, e.o.Kiln, name, data, filepath.Join(e.work, name+".log"), ready, args...)
	if err != nil {
		return err
	}
	e.procs = append(e.procs, p)
	return nil
}

// tails are the ends of every log, for an error.
func (e *env) tails() string {
	var s string
	for _, p := range e.procs {
		s += fmt.Sprintf("--- kiln %s log (tail)\n%s\n", p.name, p.tail())
	}
	if e.server != nil {
		s += fmt.Sprintf("--- kiln server log (tail)\n%s\n", e.server.Tail())
	}
	return s
}

// cleanUp terminates every microVM through its API, stops the processes
// (last started first), counts what is left on the host, and removes it
// by force (QEMUs killed, networks torn down) if anything is.
func (e *env) cleanUp() error {
	if e.cleaned {
		return nil
	}
	e.cleaned = true
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, s := range e.sides {
		for _, id := range s.ids {
			soakbench.Terminate(ctx, s.api, id)
		}
	}
	var errs []error
	if e.server != nil {
		errs = append(errs, e.server.Stop())
	}
	for i := len(e.procs) - 1; i >= 0; i-- {
		errs = append(errs, e.procs[i].stop())
	}
	e.leftovers = map[string]soakbench.Leaks{}
	for _, d := range []struct{ name, data, log string }{
		{"node", filepath.Join(e.work, "node"), filepath.Join(e.work, "node.log")},
		{"server", e.serverDir, filepath.Join(filepath.Dir(e.serverDir), "server.log")},
	} {
		if d.data == "" {
			continue
		}
		if _, err := os.Stat(d.data); err != nil {
			continue
		}
		log, _ := os.ReadFile(d.log)
		ids := soakbench.VMIDsIn(log)
		l := soakbench.HostLeftovers(ctx, d.data, ids)
		e.leftovers[d.name] = l
		if l.Total() > 0 {
			fmt.Fprintf(e.o.Progress, "cluster bench: the %s left %d things on the host; removing them: %v\n", d.name, l.Total(), l.Details)
			soakbench.ForceRemove(d.data, ids, e.o.Progress)
		}
	}
	if e.pg != nil {
		e.pg.Stop()
	}
	return errors.Join(errs...)
}
