//go:build linux

// Package enginebench measures the VM engine: cold boot, clone, suspend
// and resume with dirtied memory, idle clone memory, and boot reliability.
// It drives the real driver on a small busybox root disk.
package enginebench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

// Options sizes the benchmark.
type Options struct {
	Runs        int // runs per timed figure (median taken); at least 5
	Boots       int // cold boots counted for boot_failures
	MemoryMiB   int
	DirtyMiB    int
	IdleClones  int
	BootTimeout time.Duration
	// PoolSize is the clone pool's size for the pooled clones (at least
	// 1); each round times a plain clone (pool off) and a pooled one.
	PoolSize int
	// SkipCold leaves out the timed cold boots (cold_boot_ms stays 0).
	SkipCold bool
	// Net gives the template and every clone a NIC and a VM network
	// (internal/netns), timed as network_setup_ms; it needs root.
	Net bool
}

// Phases are the medians of a clone's parts (qemu.StartPhases), in ms.
type Phases struct {
	Prepare float64 `json:"prepare_ms"`
	Process float64 `json:"process_start_ms"`
	Load    float64 `json:"state_load_ms"`
	Network float64 `json:"tap_move_ms"`
	Record  float64 `json:"record_ms"`
	Resume  float64 `json:"guest_resume_ms"`
	Agent   float64 `json:"agent_hello_identity_ms"`
}

func medianPhases(ps []qemu.StartPhases) Phases {
	pick := func(f func(qemu.StartPhases) time.Duration) float64 {
		var xs []float64
		for _, p := range ps {
			xs = append(xs, ms(f(p)))
		}
		return median(xs)
	}
	return Phases{
		Prepare: pick(func(p qemu.StartPhases) time.Duration { return p.Prepare }),
		Process: pick(func(p qemu.StartPhases) time.Duration { return p.Process }),
		Load:    pick(func(p qemu.StartPhases) time.Duration { return p.Load }),
		Network: pick(func(p qemu.StartPhases) time.Duration { return p.Network }),
		Record:  pick(func(p qemu.StartPhases) time.Duration { return p.Record }),
		Resume:  pick(func(p qemu.StartPhases) time.Duration { return p.Resume }),
		Agent:   pick(func(p qemu.StartPhases) time.Duration { return p.Agent }),
	}
}

// Result is printed as one JSON object.
type Result struct {
	ColdBootMs    float64 `json:"cold_boot_ms"`
	CloneMs       float64 `json:"clone_ms"`
	ClonePhases   Phases  `json:"clone_phases"`
	ClonePooledMs float64 `json:"clone_pooled_ms"`
	PooledPhases  Phases  `json:"clone_pooled_phases"`
	PoolSize      int     `json:"pool_size"`
	// QEMU's own CPU time (all threads) during a clone, and how long its
	// threads waited for a CPU: on a shared, loaded host the first says
	// what a clone costs, the second how much of its time was the wait.
	CloneCPUMs        float64 `json:"clone_qemu_cpu_ms"`
	CloneWaitMs       float64 `json:"clone_qemu_runqueue_wait_ms"`
	ClonePooledCPUMs  float64 `json:"clone_pooled_qemu_cpu_ms"`
	ClonePooledWaitMs float64 `json:"clone_pooled_qemu_runqueue_wait_ms"`
	NetworkSetupMs    float64 `json:"network_setup_ms,omitempty"`
	// The pooled clone's VM network is made in the reserved process's
	// namespace (vmm.PoolReserver): reservation and set-up, then the
	// sums of network set-up and clone (what a RunMicrovm waits for).
	NetworkSetupPooledMs     float64 `json:"network_setup_pooled_ms,omitempty"`
	CloneWithNetworkMs       float64 `json:"clone_with_network_ms,omitempty"`
	ClonePooledWithNetworkMs float64 `json:"clone_pooled_with_network_ms,omitempty"`
	LoadAvg                  string  `json:"loadavg"`
	SuspendMs                float64 `json:"suspend_ms"`
	ResumeMs                 float64 `json:"resume_ms"`
	IdleClonePSSMiB          float64 `json:"idle_clone_pss_mib"`
	MemoryMiB                int     `json:"memory_mib"`
	DirtiedMiB               int     `json:"dirtied_mib"`
	Runs                     int     `json:"runs"`
	BootFailures             int     `json:"boot_failures"`
	BootAttempts             int     `json:"boot_attempts"`
	CloneToColdRatio         float64 `json:"clone_to_cold_ratio"`
	Accel                    string  `json:"accel"`
	Machine                  string  `json:"machine"`
}

// Run executes the benchmark, writing progress to log and returning the
// result. work is a scratch data directory that is removed afterwards.
func Run(ctx context.Context, d *qemu.Driver, rootDisk, work string, o Options, log io.Writer) (Result, error) {
	r := Result{MemoryMiB: o.MemoryMiB, DirtiedMiB: o.DirtyMiB, Runs: o.Runs, Accel: string(d.Platform().Accel), Machine: d.Platform().Machine}
	defer func() {
		vms, _ := d.List(context.Background())
		for _, v := range vms {
			d.Terminate(context.Background(), v.ID)
		}
	}()
	n := 0
	// A tag of this run keeps its network namespaces apart from another
	// benchmark's or test's on the same host.
	tag := strconv.FormatInt(time.Now().UnixNano()%46656, 36)
	next := func(p string) string { n++; return fmt.Sprintf("%s-%s-%d", p, tag, n) }

	// Cold boots: the first o.Runs are timed; all count for reliability.
	var boots []float64
	attempts := max(o.Boots, o.Runs)
	if o.SkipCold {
		attempts = 0
	}
	for i := 0; i < attempts; i++ {
		id := next("boot")
		bctx, cancel := context.WithTimeout(ctx, o.BootTimeout)
		start := time.Now()
		_, err := d.Boot(bctx, vmm.BootSpec{ID: id, RootDisk: rootDisk, MemoryMiB: o.MemoryMiB})
		el := time.Since(start)
		cancel()
		if err != nil {
			r.BootFailures++
			fmt.Fprintf(log, "boot %d/%d: FAILED after %v: %v\n", i+1, attempts, el.Round(time.Millisecond), err)
		} else if len(boots) < o.Runs {
			boots = append(boots, ms(el))
		}
		if (i+1)%10 == 0 || i < o.Runs {
			fmt.Fprintf(log, "boot %d/%d: %.0f ms\n", i+1, attempts, ms(el))
		}
		d.Terminate(ctx, id)
		if err := ctx.Err(); err != nil {
			return r, err
		}
	}
	r.BootAttempts = attempts
	r.ColdBootMs = median(boots)

	// A template, as an image build would make it.
	nets := &netSet{on: o.Net, driver: d}
	defer nets.teardown()
	src := next("src")
	srcNet, err := nets.setup(ctx, src, "")
	if err != nil {
		return r, err
	}
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: src, RootDisk: rootDisk, MemoryMiB: o.MemoryMiB, Net: srcNet}); err != nil {
		return r, err
	}
	tmpl := filepath.Join(work, "template")
	if _, err := d.Snapshot(ctx, src, tmpl); err != nil {
		return r, err
	}
	nets.remove(src)
	clone := func(id string) error {
		_, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl, Net: nets.get(id)})
		return err
	}

	// Each round: a plain clone with the pool off, then a pooled one once
	// the pool is full, so both see the same load on this shared host.
	r.PoolSize = max(o.PoolSize, 1)
	var clones, pooled, netSetup, pnetSetup, cpu, wait, pcpu, pwait, withNet, pwithNet []float64
	var plainPh, pooledPh []qemu.StartPhases
	for i := 0; i < o.Runs; i++ {
		for _, withPool := range []bool{false, true} {
			if withPool {
				d.SetPoolSize(r.PoolSize)
				if err := waitPool(ctx, d, tmpl, r.PoolSize); err != nil {
					return r, err
				}
			} else {
				d.SetPoolSize(0)
			}
			id := next("clone")
			before := map[int][2]time.Duration{}
			for _, pid := range d.PooledPIDs() {
				run, w := schedstat(pid)
				before[pid] = [2]time.Duration{run, w}
			}
			t0 := time.Now()
			pool := ""
			if withPool {
				pool = tmpl
			}
			if _, err := nets.setup(ctx, id, pool); err != nil {
				return r, err
			}
			netEl := ms(time.Since(t0))
			if o.Net && withPool {
				pnetSetup = append(pnetSetup, netEl)
			} else if o.Net {
				netSetup = append(netSetup, netEl)
			}
			start := time.Now()
			if err := clone(id); err != nil {
				return r, err
			}
			el := ms(time.Since(start))
			if withPool {
				pwithNet = append(pwithNet, netEl+el)
			} else {
				withNet = append(withNet, netEl+el)
			}
			ph, _ := d.StartPhases(id)
			info, _ := d.Inspect(ctx, id)
			run, w := schedstat(info.PID)
			run, w = run-before[info.PID][0], w-before[info.PID][1]
			if withPool {
				pooled, pooledPh = append(pooled, el), append(pooledPh, ph)
				pcpu, pwait = append(pcpu, ms(run)), append(pwait, ms(w))
			} else {
				clones, plainPh = append(clones, el), append(plainPh, ph)
				cpu, wait = append(cpu, ms(run)), append(wait, ms(w))
			}
			fmt.Fprintf(log, "clone (pooled %v): %.1f ms %+v\n", ph.Pooled, el, ph)
			d.Terminate(ctx, id)
			nets.remove(id)
		}
	}
	d.SetPoolSize(0)
	r.CloneMs, r.ClonePooledMs = median(clones), median(pooled)
	r.ClonePhases, r.PooledPhases = medianPhases(plainPh), medianPhases(pooledPh)
	r.NetworkSetupMs, r.NetworkSetupPooledMs = median(netSetup), median(pnetSetup)
	r.CloneWithNetworkMs, r.ClonePooledWithNetworkMs = median(withNet), median(pwithNet)
	r.CloneCPUMs, r.CloneWaitMs, r.ClonePooledCPUMs, r.ClonePooledWaitMs = median(cpu), median(wait), median(pcpu), median(pwait)
	fmt.Fprintf(log, "qemu cpu ms: plain %v pooled %v\nqemu run-queue wait ms: plain %v pooled %v\n", round1(cpu), round1(pcpu), round1(wait), round1(pwait))
	fmt.Fprintf(log, "clone: %v ms\npooled clone: %v ms\n", clones, pooled)
	if o.Net {
		fmt.Fprintf(log, "network set-up ms: plain %v pooled (reserved namespace) %v\n", round1(netSetup), round1(pnetSetup))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		r.LoadAvg = strings.TrimSpace(string(b))
	}

	// Idle clones sharing one template.
	var ids []string
	for i := 0; i < o.IdleClones; i++ {
		id := next("idle")
		if _, err := nets.setup(ctx, id, ""); err != nil {
			return r, err
		}
		if err := clone(id); err != nil {
			return r, err
		}
		ids = append(ids, id)
	}
	time.Sleep(2 * time.Second) // let them settle into idle
	var pss []float64
	for _, id := range ids {
		info, _ := d.Inspect(ctx, id)
		p, err := pssMiB(info.PID)
		if err != nil {
			return r, err
		}
		pss = append(pss, p)
	}
	r.IdleClonePSSMiB = median(pss)
	fmt.Fprintf(log, "idle clone pss (MiB, %d clones): %v\n", len(ids), round1(pss))
	for _, id := range ids {
		d.Terminate(ctx, id)
		nets.remove(id)
	}

	// Suspend and resume of a clone with DirtyMiB of memory written.
	var sus, res []float64
	for i := 0; i < o.Runs; i++ {
		id := next("sr")
		if _, err := nets.setup(ctx, id, ""); err != nil {
			return r, err
		}
		if err := clone(id); err != nil {
			return r, err
		}
		a, err := d.Agent(ctx, id)
		if err != nil {
			return r, err
		}
		script := fmt.Sprintf("mkdir -p /dirty && mount -t tmpfs -o size=%dm tmpfs /dirty && yes kiln-dirty-page | head -c %d > /dirty/fill", o.DirtyMiB+32, o.DirtyMiB<<20)
		if _, errOut, code, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", script}}); err != nil || code != 0 {
			return r, fmt.Errorf("dirtying memory: exit %d, %v: %s", code, err, errOut)
		}
		start := time.Now()
		if err := d.Suspend(ctx, id); err != nil {
			return r, err
		}
		sus = append(sus, ms(time.Since(start)))
		start = time.Now()
		if _, err := d.Resume(ctx, id); err != nil {
			return r, err
		}
		res = append(res, ms(time.Since(start)))
		a, _ = d.Agent(ctx, id)
		out, _, _, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", "wc -c < /dirty/fill"}})
		if err != nil || strings.TrimSpace(out) != strconv.Itoa(o.DirtyMiB<<20) {
			return r, fmt.Errorf("dirtied memory lost across suspend/resume: %q %v", out, err)
		}
		d.Terminate(ctx, id)
		nets.remove(id)
	}
	r.SuspendMs, r.ResumeMs = median(sus), median(res)
	fmt.Fprintf(log, "suspend: %v ms\nresume: %v ms\n", sus, res)
	if r.ColdBootMs > 0 {
		r.CloneToColdRatio = r.CloneMs / r.ColdBootMs
	}
	return r, nil
}

// JSON renders the result on one line.
func (r Result) JSON() string {
	b, _ := json.Marshal(r)
	return string(b)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func round1(xs []float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(int(x*10+0.5)) / 10
	}
	return out
}

// pssMiB reads a process's proportional set size.
func pssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "Pss:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no Pss in smaps_rollup of %d", pid)
}

// waitPool waits until template tmpl has n processes started ahead.
func waitPool(ctx context.Context, d *qemu.Driver, tmpl string, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for d.PoolSize(tmpl) < n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the clone pool to fill: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// netSet makes and removes the VM networks of the benchmark's VMs.
type netSet struct {
	on     bool
	driver *qemu.Driver
	vms    map[string]*guestvm.VM
}

// setup makes id's network; with pool (a template), around a pooled
// clone process of that template, which must be there.
func (s *netSet) setup(ctx context.Context, id, pool string) (*vmm.NetAttachment, error) {
	if !s.on {
		return nil, nil
	}
	g, err := guestvm.New(ctx, guestvm.Config{ID: id, Driver: s.driver, Template: pool})
	if err != nil {
		return nil, err
	}
	if pool != "" && !g.Pooled {
		g.Close()
		return nil, fmt.Errorf("no pooled process to reserve for %s", id)
	}
	if s.vms == nil {
		s.vms = map[string]*guestvm.VM{}
	}
	s.vms[id] = g
	return g.Net.Attachment(), nil
}

func (s *netSet) get(id string) *vmm.NetAttachment {
	if g := s.vms[id]; g != nil {
		return g.Net.Attachment()
	}
	return nil
}

func (s *netSet) remove(id string) {
	if g := s.vms[id]; g != nil {
		g.Close()
		delete(s.vms, id)
	}
}

func (s *netSet) teardown() {
	for id := range s.vms {
		s.remove(id)
	}
}

// schedstat sums the CPU time and the run-queue wait of all threads of
// process pid (/proc/PID/task/*/schedstat, in nanoseconds). Threads that
// ended are not counted.
func schedstat(pid int) (run, wait time.Duration) {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue
		}
		r, _ := strconv.ParseInt(f[0], 10, 64)
		w, _ := strconv.ParseInt(f[1], 10, 64)
		run += time.Duration(r)
		wait += time.Duration(w)
	}
	return run, wait
}
