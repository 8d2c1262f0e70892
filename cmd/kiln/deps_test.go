package main

import (
	"os/exec"
	"path"
	"strings"
	"testing"
)

// TestBinaryLinksNoTestHelpers keeps test helpers out of bin/kiln (issue
// 12): packages such as vmmtest, pgtest or testenv, and Go's own testing
// packages, are for tests; what benchmarks need at run time lives in
// packages of their own (busybox, pglocal, the *bench packages).
func TestBinaryLinksNoTestHelpers(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list -deps: %v: %s", err, ee.Stderr)
		}
		t.Fatalf("go list -deps: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		// Other modules' helpers (netlink's nltest) are theirs to place.
		ours := strings.HasPrefix(p, "github.com/kiln-sandbox/kiln/")
		base := path.Base(p)
		if p == "testing" || strings.HasPrefix(p, "testing/") || p == "net/http/httptest" ||
			ours && (strings.HasSuffix(base, "test") || base == "testenv") {
			t.Errorf("bin/kiln links %s, a test helper: move what the binary needs out of it", p)
		}
	}
}
