//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/clusterbench"
)

// `kiln bench cluster`: control+node+edge on PostgreSQL against one kiln
// server on SQLite, in one run; joins the bench group of engine.go.
func init() {
	var o clusterbench.Options
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Benchmark kiln as a cluster (control, node, edge on PostgreSQL) against one kiln server: RunMicrovm to RUNNING and HTTPS requests to a microVM; prints JSON",
		Long: `Start, as child processes of this kiln binary (kiln-agent next to it, the
guest kernel of DATA_DIR/kernel): a private PostgreSQL (postgresql-15,
make setup), the cluster CA, one kiln control, one kiln node and one kiln
edge, and one kiln server on SQLite; build the same FROM scratch image on
both (a tiny static HTTP server compiled with go build, or --app); then
measure RunMicrovm until RUNNING (--runs microVMs on each, one at a time)
and GET requests over HTTPS to a running microVM through the edge and
through the server's endpoint proxy (--rounds rounds of --duration with
--clients kept-alive connections, alternating). Prints the medians and the
ratio cluster/server of each as JSON. Every process, microVM and network
namespace is removed at the end, on error too.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			var err error
			if o.Kiln, o.KernelDir, err = benchBinaryAndKernel(o.KernelDir); err != nil {
				return err
			}
			o.Progress = os.Stderr
			res, err := clusterbench.Run(ctx, o)
			if res != nil {
				b, _ := json.MarshalIndent(res, "", "  ")
				fmt.Println(string(b))
			}
			return err
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Runs, "runs", 5, "microVMs started on each side, one at a time, for RunMicrovm to RUNNING")
	f.IntVar(&o.Rounds, "rounds", 3, "request rounds on each side, alternating")
	f.DurationVar(&o.Duration, "duration", 5*time.Second, "length of one request round")
	f.IntVar(&o.Clients, "clients", 8, "concurrent kept-alive HTTPS clients in a request round")
	f.StringVar(&o.App, "app", "", "static binary serving HTTP on :8080 for the image (default: a tiny Go server compiled with go build)")
	f.StringVar(&o.KernelDir, "kernel-dir", "", "guest kernel directory (default: DATA_DIR/kernel)")
	f.StringVar(&o.Dir, "dir", "", "parent of the scratch directory (default: the system's temp dir; keep it short: VM socket paths live under it)")
	f.BoolVar(&o.Keep, "keep", false, "keep the scratch directory and logs")
	benchCmd.AddCommand(cmd)
}
