// Command kiln is the host side of kiln: the API server, the VM engine and
// the CLI. Subcommands live in their own files and register themselves on
// rootCmd from init, so each area of the CLI stays in one place.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

var rootCmd = &cobra.Command{
	Use:           "kiln",
	Short:         "Self-hosted VM-isolated sandboxes, compatible with AWS Lambda MicroVMs",
	SilenceUsage:  true,
	SilenceErrors: true,
}

// dataDir is shared by every subcommand that touches kiln's files.
var dataDir string

func init() {
	rootCmd.PersistentFlags().StringVar(&dataDir, "data-dir", envOr("KILN_DATA_DIR", "/var/lib/kiln"), "kiln's data directory")
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func main() {
	if err := rootCmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kiln:", err)
		os.Exit(1)
	}
}
