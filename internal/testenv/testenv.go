// Package testenv gates tests on what they need (root, VMs) and on
// `go test -short`, which `make check` uses to run only what needs neither:
// one place decides, instead of a check in every test file.
package testenv

import (
	"flag"
	"fmt"
	"os"
	"testing"
	"time"
)

// Short reports whether the run is -short. It may be called from TestMain,
// before m.Run has parsed the flags.
func Short() bool {
	if !flag.Parsed() {
		flag.Parse()
	}
	return testing.Short()
}

// NeedRoot skips t under -short, and when the test does not run as root
// (why says what root is needed for).
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	if Short() {
		t.Skip("-short: skips tests that need root (" + why + ")")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: " + why)
	}
}

// SkipMain says, for a TestMain whose tests all need root or VMs, whether
// to skip them: under -short always (printing why), and when not root,
// except in CI (CI set), where a missing prerequisite fails the run.
func SkipMain(pkg, why string) bool {
	if Short() {
		fmt.Fprintf(os.Stderr, "-short: skipping %s tests (%s)\n", pkg, why)
		return true
	}
	if os.Geteuid() == 0 {
		return false
	}
	if os.Getenv("CI") != "" {
		fmt.Fprintf(os.Stderr, "%s tests need root (%s); in CI they must run\n", pkg, why)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "skipping %s tests: they need root (%s)\n", pkg, why)
	return true
}

// WaitFor polls cond until it holds, and fails t if it does not within
// timeout, naming what it waited for.
func WaitFor(t testing.TB, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}
