//go:build linux

// Command kiln-agent is the guest agent: PID 1 inside every kiln microVM.
// It is built static (CGO_ENABLED=0) and shipped as /init in the initramfs.
package main

import (
	"fmt"
	"os"

	"github.com/kiln-sandbox/kiln/internal/agent/guest"
)

func main() {
	// The agent re-executed to start a workload with fewer capabilities.
	guest.MaybeCapExec()
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "kiln-agent: must run as PID 1 inside a kiln guest")
		os.Exit(2)
	}
	guest.RunInit()
}
