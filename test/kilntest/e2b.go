//go:build linux

package kilntest

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// E2BTemplate is the name of the kiln image the E2B SDK scripts of
// test/e2b run (KILN_TEMPLATE).
const E2BTemplate = "e2b-busybox"

// E2BDir is test/e2b from a test's directory: the SDK scripts and their
// node_modules.
var E2BDir = filepath.Join("..", "e2b")

// E2BTemplateCode writes, under work, the code package of E2BTemplate:
// busybox only, with /bin/bash a script handing over to busybox's sh,
// since the SDK runs every command as `/bin/bash -l -c CMD`; busybox's
// httpd serves / on 8080.
func E2BTemplateCode(work, busybox string) (string, error) {
	bash := filepath.Join(work, "bash")
	if err := os.WriteFile(bash, []byte("#!/bin/sh\nexec /bin/sh \"$@\"\n"), 0o755); err != nil {
		return "", err
	}
	code := filepath.Join(work, "template.zip")
	dockerfile := "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n"
	return code, CodePackage(code, dockerfile, map[string]string{"bin/busybox": busybox, "bin/sh": busybox, "bin/bash": bash})
}

// E2BKey runs `kiln keys create --e2b` with the global flags and args
// and returns the new E2B API key.
func E2BKey(ctx context.Context, t *testing.T, kiln string, global []string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, kiln, append(append(append([]string{}, global...), "keys", "create", "--e2b"), args...)...)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("kiln keys create --e2b: %v\n%s", err, stderr)
	}
	var k struct {
		E2BAPIKey string `json:"e2bApiKey"`
	}
	if err := json.Unmarshal(out, &k); err != nil || k.E2BAPIKey == "" {
		t.Fatalf("kiln keys create --e2b printed %q: %v", out, err)
	}
	return k.E2BAPIKey
}

// RunE2BScripts runs the named SDK scripts of E2BDir (all but lib.mjs
// when names is empty; e2b.mjs first), each a subtest, with env.
func RunE2BScripts(ctx context.Context, t *testing.T, node string, env []string, names ...string) {
	t.Helper()
	if len(names) == 0 {
		all, _ := filepath.Glob(filepath.Join(E2BDir, "*.mjs"))
		for _, p := range all {
			if n := filepath.Base(p); n != "lib.mjs" {
				names = append(names, n)
			}
		}
		sort.SliceStable(names, func(i, j int) bool { return names[i] == "e2b.mjs" && names[j] != "e2b.mjs" })
	}
	for _, script := range names {
		t.Run(strings.TrimSuffix(script, ".mjs"), func(t *testing.T) {
			start := time.Now()
			cmd := exec.CommandContext(ctx, node, script)
			cmd.Dir = E2BDir
			cmd.Env = env
			cmd.WaitDelay = 5 * time.Second
			out, err := cmd.CombinedOutput()
			t.Logf("%s (%v):\n%s", script, time.Since(start).Round(100*time.Millisecond), out)
			if err != nil {
				t.Errorf("%s failed: %v", script, err)
			}
		})
	}
}
