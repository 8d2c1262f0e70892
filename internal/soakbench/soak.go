//go:build linux

// Package soakbench is `kiln bench soak`: run/suspend/resume/terminate
// cycles against a real `kiln server` (real microVMs) while the server is
// killed with SIGKILL at random, seeded points and restarted, then an
// exact count of what was left behind: QEMU processes, network
// namespaces, host links, TAP devices, nftables tables, cgroups, mounts
// and files of this data directory, records stuck in a transitional state
// and records lost. Every count must be 0.
//
// It drives kiln only from outside (a child process and the API), so it
// lives apart from the packages the server runs.
package soakbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// Options configure a soak.
type Options struct {
	Kiln      string // the kiln binary (kiln-agent next to it)
	App       string // static binary for the image; "" uses busybox httpd
	KernelDir string // guest kernel directory (DATA_DIR/kernel of the host set-up)
	Dir       string // parent of the scratch directory ("" : the system's temp dir)
	Cycles    int
	// Concurrency is how many cycles run at once.
	Concurrency int
	Seed        uint64
	// KillAfter bounds the random time the server lives before it is
	// killed: uniform in [KillAfter/10, KillAfter].
	KillAfter time.Duration
	// StepTimeout bounds each wait for a stable state.
	StepTimeout time.Duration
	Keep        bool // keep the scratch directory
	Progress    io.Writer
}

// Result is what the soak prints as JSON.
type Result struct {
	Seed            uint64         `json:"seed"`
	Cycles          int            `json:"cycles"`
	CyclesCompleted int            `json:"cyclesCompleted"`
	CycleErrors     []string       `json:"cycleErrors,omitempty"`
	Kills           int            `json:"serverKills"`
	Seconds         float64        `json:"seconds"`
	MicrovmsCreated int            `json:"microvmsCreated"`
	FinalStates     map[string]int `json:"finalStates"`
	RecordsStuck    int            `json:"recordsStuck"`
	RecordsLost     int            `json:"recordsLost"`
	Leaks           Leaks          `json:"leaks"`
	DataDir         string         `json:"dataDir"`
	// RecoveryRemoved are the server's own words for every VM its
	// recovery gave up on: the data directory (and its log) is gone
	// after the soak, and a lost microVM needs its cause.
	RecoveryRemoved []string `json:"recoveryRemoved,omitempty"`
}

// OK says whether nothing leaked, stuck or got lost.
func (r *Result) OK() bool {
	return r.RecordsStuck == 0 && r.RecordsLost == 0 && r.Leaks.Total() == 0
}

const imageName = "soak"

// Run builds a tiny image on a fresh data directory, runs the cycles
// while killing the server, and counts what is left.
func Run(ctx context.Context, o Options) (_ *Result, err error) {
	if o.Cycles <= 0 {
		o.Cycles = 10
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 1
	}
	if o.KillAfter <= 0 {
		o.KillAfter = 8 * time.Second
	}
	if o.StepTimeout <= 0 {
		o.StepTimeout = 3 * time.Minute
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.App == "" {
		bb, err := lookBusybox()
		if err != nil {
			return nil, err
		}
		o.App = bb
	}
	work, data, err := ScratchDataDir(o.Dir, "ksoak", o.KernelDir)
	if work != "" && !o.Keep {
		defer os.RemoveAll(work)
	}
	if err != nil {
		return nil, err
	}
	code := filepath.Join(work, "code.zip")
	if err := codePackage(code, o.App); err != nil {
		return nil, err
	}
	res := &Result{Seed: o.Seed, Cycles: o.Cycles, DataDir: data, FinalStates: map[string]int{}}
	fmt.Fprintf(o.Progress, "soak: seed %d, %d cycles (%d at once), data dir %s\n", o.Seed, o.Cycles, o.Concurrency, data)
	start := time.Now()

	srv := &server{kiln: o.Kiln, data: data, log: filepath.Join(work, "server.log"), api: freeAddr(), endpoint: freeAddr(), metrics: freeAddr(), progress: o.Progress}
	if err := srv.start(ctx); err != nil {
		return nil, err
	}
	// Whatever happens, no server of ours outlives the soak, and a soak
	// cut short by an error leaves none of its VMs running on the host.
	defer func() {
		srv.stop()
		if err != nil {
			logIDs, _ := os.ReadFile(srv.log)
			removeAll(data, vmIDsIn(logIDs), o.Progress)
		}
	}()
	creds, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		return nil, err
	}
	c := &client{c: awscli.NewClient(srv.url(), "us-east-1", creds)}
	c.c.HTTP.Timeout = 30 * time.Second

	if err := c.createImage(ctx, imageName, code, o.StepTimeout+5*time.Minute); err != nil {
		return nil, fmt.Errorf("building the soak image: %w\n%s", err, srv.tail())
	}
	fmt.Fprintf(o.Progress, "soak: image built in %s\n", time.Since(start).Round(time.Second))

	// The killer: SIGKILL at a random point, restart, repeat.
	rng := rand.New(rand.NewPCG(o.Seed, o.Seed^0x5eed))
	var rngMu sync.Mutex
	killCtx, stopKiller := context.WithCancel(ctx)
	killerDone := make(chan error, 1)
	go func() {
		for {
			rngMu.Lock()
			d := o.KillAfter/10 + time.Duration(rng.Int64N(int64(o.KillAfter-o.KillAfter/10)+1))
			rngMu.Unlock()
			select {
			case <-killCtx.Done():
				killerDone <- nil
				return
			case <-time.After(d):
			}
			srv.kill()
			res.Kills++
			fmt.Fprintf(o.Progress, "soak: kill %d after %s\n", res.Kills, d.Round(time.Millisecond))
			// One restart in four is killed again within its first
			// second, while it recovers what the last kill left.
			rngMu.Lock()
			early := time.Duration(0)
			if rng.IntN(4) == 0 {
				early = time.Duration(1+rng.IntN(1000)) * time.Millisecond
			}
			rngMu.Unlock()
			err := srv.startFor(ctx, early)
			if err == errKilledEarly {
				res.Kills++
				fmt.Fprintf(o.Progress, "soak: kill %d during start-up after %s\n", res.Kills, early)
				err = srv.start(ctx)
			}
			if err != nil {
				killerDone <- err
				return
			}
		}
	}()

	var mu sync.Mutex
	var ids []string
	next := 0
	var wg sync.WaitGroup
	for w := 0; w < o.Concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= o.Cycles || ctx.Err() != nil {
					mu.Unlock()
					return
				}
				i := next
				next++
				mu.Unlock()
				t0 := time.Now()
				id, err := c.cycle(ctx, fmt.Sprintf("soak-%d-%d", o.Seed, i), o.StepTimeout)
				mu.Lock()
				if id != "" {
					ids = append(ids, id)
				}
				if err != nil {
					res.CycleErrors = append(res.CycleErrors, fmt.Sprintf("cycle %d (%s): %v", i, id, err))
				} else {
					res.CyclesCompleted++
				}
				mu.Unlock()
				fmt.Fprintf(o.Progress, "soak: cycle %d %s done in %s (err %v)\n", i, id, time.Since(t0).Round(time.Millisecond), err)
			}
		}()
	}
	wg.Wait()
	stopKiller()
	if err := <-killerDone; err != nil {
		return nil, fmt.Errorf("restarting the server: %w", err)
	}
	// One last cycle with no kill: what a kill-free terminate leaves is
	// not cleaned up by a restart after it.
	if id, err := c.cycle(ctx, fmt.Sprintf("soak-%d-calm", o.Seed), o.StepTimeout); err != nil {
		res.CycleErrors = append(res.CycleErrors, fmt.Sprintf("calm cycle (%s): %v", id, err))
		if id != "" {
			ids = append(ids, id)
		}
	} else {
		ids = append(ids, id)
		fmt.Fprintf(o.Progress, "soak: calm cycle %s done\n", id)
	}
	res.MicrovmsCreated = len(ids)

	// Settle: every record reaches a stable state, then whatever a failed
	// cycle left alive is terminated so that nothing may remain.
	if err := c.settleAndCount(ctx, ids, res, o.StepTimeout); err != nil {
		return nil, fmt.Errorf("final check: %w\n%s", err, srv.tail())
	}
	if err := srv.stop(); err != nil {
		fmt.Fprintf(o.Progress, "soak: stopping the server: %v\n", err)
	}
	images, err := checkRecords(ctx, data, ids, res)
	if err != nil {
		return nil, fmt.Errorf("final check: %w", err)
	}
	logIDs, _ := os.ReadFile(srv.log)
	res.Leaks = countLeaks(ctx, data, append(ids, vmIDsIn(logIDs)...), images)
	res.RecoveryRemoved = linesWith(logIDs, "recovery removed a vm")
	res.Seconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	return res, nil
}

func lookBusybox() (string, error) {
	for _, p := range []string{"/usr/bin/busybox", "/bin/busybox"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("no static busybox (install busybox-static, or pass --app)")
}

// codePackage writes a FROM scratch image holding app as /app. A busybox
// runs its httpd; any other app is expected to serve on its own.
func codePackage(path, app string) error {
	df := "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n"
	if filepath.Base(app) == "busybox" {
		// busybox picks its applet from argv[0] unless that is "busybox".
		df = "FROM scratch\nCOPY app /busybox\nCMD [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n"
	}
	return awscli.WriteCodePackage(path, df, map[string]string{"app": app})
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer ln.Close()
	return "127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// linesWith returns the lines of log that contain s.
func linesWith(log []byte, s string) []string {
	var out []string
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}
