//go:build linux

package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/proxy"
)

// `kiln bench proxy`: kiln's endpoint proxy against nginx (its peer, from
// Debian, started by the benchmark on loopback) and against direct
// requests to a plain HTTP backend, from one client, modes interleaved
// (issue 15 target: kiln's throughput at least nginx's and its added
// p50 at most nginx's, for HTTP/1.1 and h2, with the token check on).
// Joins the bench group of engine.go (Linux, like this file).
func init() {
	var o proxy.BenchOptions
	var cpuProfile, proxyProfile, proxyMemProfile string
	var inProcess bool
	var baseline string
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Benchmark the endpoint proxy against nginx and direct requests to a plain backend; prints JSON on the last line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			stopProfile, err := startCPUProfile(cpuProfile)
			if err != nil {
				return err
			}
			defer stopProfile()
			if !inProcess {
				// kiln's proxy in a process of its own, as nginx and `kiln
				// serve` run: the client's work and garbage stay out of it.
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				o.ProxyCommand = []string{exe, "bench", "proxy-serve"}
				if proxyProfile != "" {
					o.ProxyCommand = append(o.ProxyCommand, "--cpuprofile", proxyProfile)
				}
				if proxyMemProfile != "" {
					o.ProxyCommand = append(o.ProxyCommand, "--memprofile", proxyMemProfile)
				}
			}
			if baseline != "" {
				o.BaselineCommand = []string{baseline, "bench", "proxy-serve"}
			}
			res, err := proxy.Bench(ctx, o)
			if err != nil {
				return err
			}
			fmt.Print(res.String())
			fmt.Println(res.JSON())
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Rounds, "rounds", 5, "rounds over all modes, interleaved; figures are medians over rounds")
	f.IntVar(&o.Requests, "requests", 1000, "sequential requests per mode and round, for latency")
	f.IntVar(&o.Concurrency, "concurrency", 32, "parallel clients per mode, for throughput")
	f.DurationVar(&o.Duration, "duration", 2*time.Second, "throughput phase per mode and round")
	f.IntVar(&o.BodySize, "body-size", 1024, "response body bytes")
	f.DurationVar(&o.BackendDelay, "backend-delay", 0, "time the stand-in app takes per request (0 measures the proxies' own cost)")
	f.StringVar(&o.Nginx, "nginx", "", "nginx binary (default: PATH, then /usr/sbin/nginx)")
	f.IntVar(&o.NginxWorkers, "nginx-workers", 0, "nginx worker_processes (default: the GOMAXPROCS of kiln's proxy)")
	f.BoolVar(&inProcess, "in-process", false, "run kiln's proxy inside the benchmark process instead of its own")
	f.StringVar(&baseline, "baseline", "", "another kiln binary whose proxy runs as the extra modes kiln-baseline (before/after a change in one run)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the benchmark process (client, backend; and kiln's proxy with --in-process) to this file")
	f.StringVar(&proxyProfile, "proxy-cpuprofile", "", "write a CPU profile of kiln's proxy process to this file")
	f.StringVar(&proxyMemProfile, "proxy-memprofile", "", "write an allocation profile of kiln's proxy process to this file when it ends (go tool pprof -sample_index=alloc_space)")
	benchCmd.AddCommand(cmd)

	var serveProfile, serveMemProfile string
	serve := &cobra.Command{
		Use:    "proxy-serve",
		Short:  "kiln's proxy for `kiln bench proxy` (configuration on stdin; serves until stdin closes)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			stopProfile, err := startCPUProfile(serveProfile)
			if err != nil {
				return err
			}
			defer stopProfile()
			if err := proxy.ServeBenchProxy(ctx, os.Stdin, os.Stdout); err != nil {
				return err
			}
			return writeHeapProfile(serveMemProfile)
		},
	}
	serve.Flags().StringVar(&serveProfile, "cpuprofile", "", "write a CPU profile of the proxy to this file")
	serve.Flags().StringVar(&serveMemProfile, "memprofile", "", "write an allocation profile of the proxy to this file when it ends")
	benchCmd.AddCommand(serve)
}

// startCPUProfile profiles this process into path until the returned
// function runs; "" profiles nothing.
func startCPUProfile(path string) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// writeHeapProfile writes the allocations since the start into path;
// "" writes nothing.
func writeHeapProfile(path string) error {
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}
