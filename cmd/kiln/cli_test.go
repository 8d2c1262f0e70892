package main

import (
	"testing"

	"github.com/spf13/pflag"
)

// cliRunner returns a function that runs kiln's CLI in this process with
// --data-dir dir and returns its output, failing the test on an error.
func cliRunner(t *testing.T, dir string) func(args ...string) string {
	return func(args ...string) string {
		t.Helper()
		out, err := runFresh(t, dir, args...)
		if err != nil {
			t.Fatalf("kiln %v: %v", args, err)
		}
		return out
	}
}

// runFresh is runCLI with every subcommand's flags back at their defaults
// and --data-dir dir.
func runFresh(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	// One process runs one command; here flags must start afresh.
	for _, c := range rootCmd.Commands() {
		for _, sub := range c.Commands() {
			sub.LocalNonPersistentFlags().VisitAll(func(f *pflag.Flag) {
				f.Value.Set(f.DefValue)
				f.Changed = false
			})
		}
	}
	// Never the real data directory, whatever flag state is left.
	return runCLI(t, append(args, "--data-dir", dir)...)
}
