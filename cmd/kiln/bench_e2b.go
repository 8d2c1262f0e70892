//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/e2bbench"
)

// `kiln bench e2b`: the E2B SDK's Sandbox.create and commands.run against
// RunMicrovm to the first HTTP 200, on one real server; joins the bench
// group of engine.go.
func init() {
	var o e2bbench.Options
	cmd := &cobra.Command{
		Use:   "e2b",
		Short: "Benchmark the official E2B SDK (Sandbox.create to first output, commands.run echo) against RunMicrovm to first HTTP 200; prints JSON",
		Long: `Start a kiln server on a fresh scratch data directory (this kiln binary,
kiln-agent next to it, the guest kernel of DATA_DIR/kernel), build a tiny
FROM scratch busybox image, then with node and the official e2b package
(node_modules of --sdk-dir, installed there with npm ci when missing)
create --runs sandboxes, timing Sandbox.create to the first output of a
command and --echoes commands.run("echo") round trips in each; then run
--runs microVMs of the same image through the AWS API, timing RunMicrovm
to the endpoint's first HTTP 200. Prints p50 and p99 of each as JSON.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			var err error
			if o.Kiln, o.KernelDir, err = benchBinaryAndKernel(o.KernelDir); err != nil {
				return err
			}
			o.Progress = os.Stderr
			res, err := e2bbench.Run(ctx, o)
			if err != nil {
				return err
			}
			b, _ := json.MarshalIndent(res, "", "  ")
			fmt.Println(string(b))
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Runs, "runs", 10, "sandboxes created through the SDK, and microVMs run through the AWS API")
	f.IntVar(&o.Echoes, "echoes", 10, "commands.run(\"echo\") round trips per sandbox")
	f.StringVar(&o.SDKDir, "sdk-dir", "test/e2b", "folder whose node_modules holds the e2b package (npm ci runs there when it does not)")
	f.StringVar(&o.Node, "node", "", "node binary (default: PATH)")
	f.StringVar(&o.KernelDir, "kernel-dir", "", "guest kernel directory (default: DATA_DIR/kernel)")
	f.StringVar(&o.Dir, "dir", "", "parent of the scratch data directory (default: the system's temp dir; keep it short: VM socket paths live under it)")
	f.BoolVar(&o.Keep, "keep", false, "keep the scratch data directory and server log")
	benchCmd.AddCommand(cmd)
}

// benchBinaryAndKernel is what a bench that starts `kiln server` needs:
// this kiln binary, and the guest kernel folder (default DATA_DIR/kernel).
func benchBinaryAndKernel(kernelDir string) (string, string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", "", fmt.Errorf("finding the kiln binary: %w", err)
	}
	if kernelDir == "" {
		kernelDir = filepath.Join(dataDir, "kernel")
	}
	if _, err := os.Stat(filepath.Join(kernelDir, "vmlinuz")); err != nil {
		return "", "", fmt.Errorf("no guest kernel in %s (run `make setup`, or pass --kernel-dir): %w", kernelDir, err)
	}
	return exe, kernelDir, nil
}
