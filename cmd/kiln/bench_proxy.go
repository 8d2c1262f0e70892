//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// `kiln bench proxy`: the endpoint proxy's added latency and throughput
// against a plain HTTP backend on this host, next to the same load sent
// directly (issue targets: under 1 ms added at p50, at least 70% of the
// direct throughput). Joins the bench group of engine.go (Linux, like
// this file).
func init() {
	var o proxy.BenchOptions
	var cpuProfile string
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Benchmark the endpoint proxy against direct requests to a plain backend; prints JSON on the last line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			res, err := proxy.Bench(ctx, o)
			if err != nil {
				return err
			}
			fmt.Printf("GOMAXPROCS %d\n", runtime.GOMAXPROCS(0))
			fmt.Print(res.String())
			fmt.Println(proxyBenchJSON(res))
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Requests, "requests", 2000, "sequential requests per mode for latency")
	f.IntVar(&o.Concurrency, "concurrency", 32, "parallel clients per mode for throughput")
	f.DurationVar(&o.Duration, "duration", 3*time.Second, "throughput phase per mode")
	f.IntVar(&o.BodySize, "body-size", 1024, "response body bytes")
	f.DurationVar(&o.BackendDelay, "backend-delay", 0, "time the stand-in app takes per request (0 measures the proxy's own cost)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run (client, proxy and backend) to this file")
	benchCmd.AddCommand(cmd)
}

// proxyBenchJSON is the one-line summary: per mode p50/p99 in ms, req/s,
// errors; and for each proxied mode the added p50 and the share of the
// direct throughput, with whether the targets are met.
func proxyBenchJSON(r proxy.BenchResult) string {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	type mode struct {
		Mode          string  `json:"mode"`
		P50           float64 `json:"p50_ms"`
		P99           float64 `json:"p99_ms"`
		RPS           float64 `json:"rps"`
		Errors        int64   `json:"errors"`
		AddedP50      float64 `json:"added_p50_ms"`
		ThroughputPct float64 `json:"throughput_pct_of_direct"`
		TargetsMet    bool    `json:"targets_met"`
	}
	out := struct {
		Benchmark   string  `json:"benchmark"`
		Requests    int     `json:"requests"`
		Concurrency int     `json:"concurrency"`
		Seconds     float64 `json:"seconds_per_mode"`
		BodySize    int     `json:"body_size"`
		Modes       []mode  `json:"modes"`
	}{Benchmark: "proxy", Requests: r.Opts.Requests, Concurrency: r.Opts.Concurrency, Seconds: r.Opts.Duration.Seconds(), BodySize: r.Opts.BodySize}
	if len(r.Modes) == 0 {
		b, _ := json.Marshal(out)
		return string(b)
	}
	d := r.Modes[0]
	for i, m := range r.Modes {
		x := mode{Mode: m.Mode, P50: ms(m.P50), P99: ms(m.P99), RPS: m.RPS, Errors: m.Errors, AddedP50: ms(m.P50 - d.P50)}
		if d.RPS > 0 {
			x.ThroughputPct = 100 * m.RPS / d.RPS
		}
		x.TargetsMet = i > 0 && strings.HasPrefix(m.Mode, "proxy") && m.Errors == 0 && m.P50-d.P50 < time.Millisecond && x.ThroughputPct >= 70
		out.Modes = append(out.Modes, x)
	}
	b, _ := json.Marshal(out)
	return string(b)
}
