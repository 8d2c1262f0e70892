//go:build linux

package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/enginebench"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/imagebench"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/busybox"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
)

var accelFlag, logLevel string

// newLogger logs to stderr at the level given by --log-level.
func newLogger() *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(logLevel)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

var engineCmd = &cobra.Command{Use: "engine", Short: "Drive the VM engine directly (development)"}

func init() {
	rootCmd.PersistentFlags().StringVar(&accelFlag, "accel", "auto", "accelerator: auto, kvm or tcg")
	rootCmd.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	rootCmd.AddCommand(engineCmd)

	var o enginebench.Options
	be := &cobra.Command{
		Use:   "engine",
		Short: "Benchmark cold boot, clone, suspend/resume and clone memory; prints JSON on the last line",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if o.Runs < 5 {
				return fmt.Errorf("--runs %d: medians need at least 5 runs", o.Runs)
			}
			d, work, root, done, err := scratchEngine(ctx)
			if err != nil {
				return err
			}
			defer done()
			r, err := enginebench.Run(ctx, d, root, work, o, os.Stderr)
			if err != nil {
				return err
			}
			fmt.Println(r.JSON())
			return nil
		},
	}
	be.Flags().IntVar(&o.Runs, "runs", 5, "runs per timed figure (median)")
	be.Flags().IntVar(&o.Boots, "boots", 50, "cold boots counted for boot_failures")
	be.Flags().IntVar(&o.MemoryMiB, "memory", 512, "guest memory in MiB")
	be.Flags().IntVar(&o.DirtyMiB, "dirty", 256, "MiB of guest memory written before suspend")
	be.Flags().IntVar(&o.IdleClones, "clones", 8, "idle clones of one template running at once")
	be.Flags().DurationVar(&o.BootTimeout, "boot-timeout", 30*time.Second, "a cold boot slower than this counts as failed")
	be.Flags().BoolVar(&o.SkipCold, "skip-cold", false, "leave out the timed cold boots (for clone figures on a busy host)")
	be.Flags().IntVar(&o.PoolSize, "pool", 1, "clone pool size per template for the pooled clones")
	be.Flags().BoolVar(&o.Net, "net", os.Geteuid() == 0, "give the template and clones a NIC and a VM network (needs root)")
	benchCmd.AddCommand(be)

	var eo enginebench.EndpointBenchOptions
	var app string
	bep := &cobra.Command{
		Use:   "endpoint",
		Short: "Benchmark auto-resume through the HTTPS endpoint against the engine's resume, and a load run over several microVMs; prints JSON on the last line",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			d, work, root, done, err := scratchEngine(ctx)
			if err != nil {
				return err
			}
			defer done()
			tmpl, err := busybox.AppTemplate(ctx, d, root, app, work)
			if err != nil {
				return err
			}
			eo.Driver, eo.Template, eo.Dir, eo.Progress, eo.Log = d, tmpl, work, os.Stderr, newLogger()
			r, err := enginebench.BenchEndpoint(ctx, eo)
			if err != nil {
				return err
			}
			fmt.Fprintln(os.Stderr, r.String())
			fmt.Println(r.JSON())
			return nil
		},
	}
	bep.Flags().IntVar(&eo.ResumeRuns, "runs", 5, "timed auto-resumes and engine resumes (median)")
	bep.Flags().IntVar(&eo.VMs, "vms", 10, "microVMs in the load run")
	bep.Flags().IntVar(&eo.Connections, "connections", 200, "concurrent connections in the load run")
	bep.Flags().DurationVar(&eo.Duration, "duration", 60*time.Second, "length of the load run (negative: skip it)")
	bep.Flags().StringVar(&app, "app", "", "static binary serving HTTP on 8080 to run in the microVMs (default: busybox httpd, which forks per request)")
	benchCmd.AddCommand(bep)

	var ib imagebench.BenchConfig
	var apt, aptLog bool
	var ab imagebench.AptBenchConfig
	bim := &cobra.Command{
		Use:   "image",
		Short: "Benchmark an image build by step, an unchanged rebuild, and clone against cold boot until the first HTTP 200; with --apt, the package cache",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			d, work, _, done, err := scratchEngine(ctx)
			if err != nil {
				return err
			}
			defer done()
			// The managed base is shared with the real data directory:
			// building it is not what this measures.
			bases := &base.Resolver{Managed: &base.Managed{DataDir: dataDir}}
			if apt {
				ab.Driver, ab.WorkDir, ab.Out, ab.Logger, ab.Bases = d, work, os.Stderr, newLogger(), bases
				if aptLog {
					ab.BuildLog = os.Stderr
				}
				r, err := imagebench.BenchApt(ctx, ab)
				if err != nil {
					return err
				}
				fmt.Println(r.JSON())
				return nil
			}
			ib.Driver, ib.WorkDir, ib.Out, ib.Logger, ib.Bases = d, work, os.Stdout, newLogger(), bases
			_, err = imagebench.Bench(ctx, ib)
			return err
		},
	}
	bim.Flags().BoolVar(&apt, "apt", false, "measure the package cache instead: a Dockerfile that COPYs a file then runs apt-get install, built from empty caches, rebuilt after the file changed, and rebuilt unchanged (JSON on stdout)")
	bim.Flags().IntVar(&ab.Runs, "apt-runs", 3, "with --apt: runs from empty caches (median)")
	bim.Flags().StringVar(&ab.Package, "apt-package", "hello", "with --apt: the Debian package the apt step installs")
	bim.Flags().BoolVar(&ab.Cold, "apt-cold", false, "with --apt: cold-boot every build step's VM instead of starting it from a warm snapshot, to compare")
	bim.Flags().BoolVar(&aptLog, "apt-log", false, "with --apt: write the build logs to stderr, each line with the seconds since its build began")
	bim.Flags().StringVar(&ib.Example, "example", "examples/python-http", "code package folder to build")
	bim.Flags().IntVar(&ib.MemoryMiB, "memory", 512, "microVM memory in MiB")
	bim.Flags().IntVar(&ib.Clones, "runs", 5, "clones and cold boots timed (median)")
	benchCmd.AddCommand(bim)

	engineCmd.AddCommand(&cobra.Command{
		Use:   "demo",
		Short: "Boot a VM, snapshot it, start two clones from the snapshot and run a command in each",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return engineDemo(cmd.Context())
		},
	})
}

// scratchEngine starts a driver on a scratch data directory that shares
// the set-up kernel, with a busybox root disk. done closes the driver,
// removes the directory and, once no VM network is left, the host's
// nftables table and forwarding setting that the VMs' networks needed:
// a benchmark leaves the host as it found it, as `kiln server` does.
func scratchEngine(ctx context.Context) (d *qemu.Driver, work, root string, done func(), err error) {
	work, err = os.MkdirTemp(filepath.Join(dataDir), "scratch-")
	if err != nil {
		return nil, "", "", nil, fmt.Errorf("creating scratch dir in %s (run `make setup` first?): %w", dataDir, err)
	}
	if root, err = busybox.Root(work); err != nil {
		os.RemoveAll(work)
		return nil, "", "", nil, err
	}
	d, err = qemu.New(ctx, qemu.Config{DataDir: work, KernelDir: filepath.Join(dataDir, "kernel"),
		AgentBinary: qemu.DefaultAgentBinary(dataDir), Accel: accelFlag,
		BootTimeout: 3 * time.Minute, // the template's boot, on a busy host
		Log:         newLogger()})
	if err != nil {
		os.RemoveAll(work)
		return nil, "", "", nil, err
	}
	done = func() {
		d.Close()
		os.RemoveAll(work)
		if _, err := netns.RestoreHost(); err != nil {
			fmt.Fprintln(os.Stderr, "restoring host network settings:", err)
		}
	}
	return d, work, root, done, nil
}

func engineDemo(ctx context.Context) error {
	d, work, root, done, err := scratchEngine(ctx)
	if err != nil {
		return err
	}
	defer done()
	step := func(what string, f func() error) error {
		start := time.Now()
		if err := f(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		fmt.Printf("%-40s %8.1f ms\n", what, float64(time.Since(start).Microseconds())/1000)
		return nil
	}
	defer func() {
		for _, id := range []string{"demo", "clone-a", "clone-b"} {
			d.Terminate(context.Background(), id)
		}
	}()
	tmpl := filepath.Join(work, "template")
	if err := step("cold boot", func() error {
		_, err := d.Boot(ctx, vmm.BootSpec{ID: "demo", RootDisk: root})
		return err
	}); err != nil {
		return err
	}
	if err := step("snapshot", func() error { _, err := d.Snapshot(ctx, "demo", tmpl); return err }); err != nil {
		return err
	}
	for _, id := range []string{"clone-a", "clone-b"} {
		if err := step("clone "+id, func() error {
			_, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl})
			return err
		}); err != nil {
			return err
		}
		a, err := d.Agent(ctx, id)
		if err != nil {
			return err
		}
		out, _, code, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", "echo \"hello from $(hostname), kernel $(uname -r)\""}})
		if err != nil {
			return err
		}
		fmt.Printf("  %s said: %s  (exit %d)\n", id, trimNL(out), code)
	}
	if err := step("suspend clone-a", func() error { return d.Suspend(ctx, "clone-a") }); err != nil {
		return err
	}
	if err := step("resume clone-a", func() error { _, err := d.Resume(ctx, "clone-a"); return err }); err != nil {
		return err
	}
	return nil
}

func trimNL(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s
}
