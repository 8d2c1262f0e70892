package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/api/apibench"
)

// benchCmd groups the benchmarks; each area adds its own subcommand.
var benchCmd = &cobra.Command{Use: "bench", Short: "Run kiln's benchmarks"}

// `kiln bench api`: the API and store alone, no VM.
func init() {
	var o apibench.Options
	cmd := &cobra.Command{
		Use:   "api",
		Short: "Benchmark GetMicrovm, ListMicrovms and RunMicrovm (API+store only, no VM) with concurrent signed clients, on SQLite and optionally PostgreSQL; prints JSON on the last line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Printf("%d clients, %d microVM records, %s per operation, GOMAXPROCS %d\n", o.Clients, o.Records, o.Duration, runtime.GOMAXPROCS(0))
			res, err := apibench.Run(cmd.Context(), o, os.Stdout)
			if err != nil {
				return err
			}
			b, err := json.Marshal(res)
			if err != nil {
				return err
			}
			fmt.Println(string(b))
			return nil
		},
	}
	cmd.Flags().IntVar(&o.Clients, "clients", 50, "concurrent signed clients")
	cmd.Flags().IntVar(&o.Records, "records", 10000, "microVM records in the store")
	cmd.Flags().DurationVar(&o.Duration, "duration", 5*time.Second, "measuring time per operation")
	cmd.Flags().IntVar(&o.PageSize, "page-size", 50, "maxResults of ListMicrovms")
	cmd.Flags().StringVar(&o.Dir, "dir", "", "scratch directory for the database (default: the system temp dir)")
	cmd.Flags().StringVar(&o.Store, "store", "sqlite", "sqlite; postgres: SQLite, then PostgreSQL in a private cluster (postgresql-15, make setup); or a postgres:// URL of an empty, disposable database to measure after SQLite")
	rootCmd.AddCommand(benchCmd)
	benchCmd.AddCommand(cmd)
}
