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
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// Options sizes the benchmark.
type Options struct {
	Runs        int // runs per timed figure (median taken); at least 5
	Boots       int // cold boots counted for boot_failures
	MemoryMiB   int
	DirtyMiB    int
	IdleClones  int
	BootTimeout time.Duration
}

// Result is printed as one JSON object.
type Result struct {
	ColdBootMs       float64 `json:"cold_boot_ms"`
	CloneMs          float64 `json:"clone_ms"`
	SuspendMs        float64 `json:"suspend_ms"`
	ResumeMs         float64 `json:"resume_ms"`
	IdleClonePSSMiB  float64 `json:"idle_clone_pss_mib"`
	MemoryMiB        int     `json:"memory_mib"`
	DirtiedMiB       int     `json:"dirtied_mib"`
	Runs             int     `json:"runs"`
	BootFailures     int     `json:"boot_failures"`
	BootAttempts     int     `json:"boot_attempts"`
	CloneToColdRatio float64 `json:"clone_to_cold_ratio"`
	Accel            string  `json:"accel"`
	Machine          string  `json:"machine"`
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
	next := func(p string) string { n++; return fmt.Sprintf("%s-%d", p, n) }

	// Cold boots: the first o.Runs are timed; all count for reliability.
	var boots []float64
	attempts := max(o.Boots, o.Runs)
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
	src := next("src")
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: src, RootDisk: rootDisk, MemoryMiB: o.MemoryMiB}); err != nil {
		return r, err
	}
	tmpl := filepath.Join(work, "template")
	if _, err := d.Snapshot(ctx, src, tmpl); err != nil {
		return r, err
	}

	var clones []float64
	for i := 0; i < o.Runs; i++ {
		id := next("clone")
		start := time.Now()
		if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl}); err != nil {
			return r, err
		}
		clones = append(clones, ms(time.Since(start)))
		d.Terminate(ctx, id)
	}
	r.CloneMs = median(clones)
	fmt.Fprintf(log, "clone: %v ms\n", clones)

	// Idle clones sharing one template.
	var ids []string
	for i := 0; i < o.IdleClones; i++ {
		id := next("idle")
		if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl}); err != nil {
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
	}

	// Suspend and resume of a clone with DirtyMiB of memory written.
	var sus, res []float64
	for i := 0; i < o.Runs; i++ {
		id := next("sr")
		if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl}); err != nil {
			return r, err
		}
		a, err := d.Agent(ctx, id)
		if err != nil {
			return r, err
		}
		script := fmt.Sprintf("mkdir -p /dirty && mount -t tmpfs -o size=%dm tmpfs /dirty && yes kiln-dirty-page | head -c %d > /dirty/fill", o.DirtyMiB+32, o.DirtyMiB<<20)
		if _, errOut, code, err := vmmtest.Run(ctx, a, client.ExecRequest{Argv: []string{"/bin/sh", "-c", script}}); err != nil || code != 0 {
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
		out, _, _, err := vmmtest.Run(ctx, a, client.ExecRequest{Argv: []string{"/bin/sh", "-c", "wc -c < /dirty/fill"}})
		if err != nil || strings.TrimSpace(out) != strconv.Itoa(o.DirtyMiB<<20) {
			return r, fmt.Errorf("dirtied memory lost across suspend/resume: %q %v", out, err)
		}
		d.Terminate(ctx, id)
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
