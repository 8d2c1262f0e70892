//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "kiln-agent: runs only inside a Linux guest")
	os.Exit(2)
}
