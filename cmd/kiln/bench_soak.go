//go:build linux

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/soakbench"
)

// `kiln bench soak`: lifecycle cycles against a real server that is
// killed at random points; joins the bench group of engine.go.
func init() {
	var o soakbench.Options
	var seed int64
	cmd := &cobra.Command{
		Use:   "soak",
		Short: "Run run/suspend/resume/terminate cycles while killing kiln server with SIGKILL at random points; prints leaks as JSON",
		Long: `Start a kiln server on a fresh scratch data directory (this kiln binary,
kiln-agent next to it, the guest kernel of DATA_DIR/kernel), build a tiny
FROM scratch image, then run --cycles microVMs through run, suspend,
resume and terminate while the server is killed with SIGKILL at random
(seeded) points and restarted. At the end every record must be stable and
found, and nothing of the scratch data directory may remain: QEMU
processes, network namespaces, host links, TAP devices, nftables tables,
cgroups, mounts, files. Prints the counts as JSON on stdout; exits 1 when
any is not 0.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			var err error
			if o.Kiln, o.KernelDir, err = benchBinaryAndKernel(o.KernelDir); err != nil {
				return err
			}
			if seed == 0 {
				seed = time.Now().UnixNano()
			}
			o.Seed = uint64(seed)
			fmt.Fprintf(os.Stderr, "soak seed %d (rerun with --seed %d)\n", seed, seed)
			o.Progress = os.Stderr
			res, err := soakbench.Run(ctx, o)
			if err != nil {
				return err
			}
			b, _ := json.MarshalIndent(res, "", "  ")
			fmt.Println(string(b))
			if !res.OK() {
				return errors.New("soak: leaks, stuck or lost records (see the JSON above)")
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Cycles, "cycles", 10, "microVM lifecycles to run")
	f.IntVar(&o.Concurrency, "concurrency", 2, "cycles running at once")
	f.Int64Var(&seed, "seed", 0, "seed of the kill points (0: from the clock; printed)")
	f.DurationVar(&o.KillAfter, "kill-after", 8*time.Second, "the server is killed after a random time up to this (and at least a tenth of it) after each start")
	f.DurationVar(&o.StepTimeout, "step-timeout", 3*time.Minute, "longest wait for a microVM to reach a stable state")
	f.StringVar(&o.App, "app", "", "static binary run as the image's app (default: busybox httpd on 8080)")
	f.StringVar(&o.KernelDir, "kernel-dir", "", "guest kernel directory (default: DATA_DIR/kernel)")
	f.StringVar(&o.Dir, "dir", "", "parent of the scratch data directory (default: the system's temp dir; keep it short: VM socket paths live under it)")
	f.BoolVar(&o.Keep, "keep", false, "keep the scratch data directory and server log")
	benchCmd.AddCommand(cmd)
}
