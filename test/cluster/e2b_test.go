//go:build linux

package cluster

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

// TestClusterE2B runs test/e2b's scripts, the unmodified `e2b` SDK,
// against one control (E2B_API_URL), one node in its own namespace and
// one edge (E2B_SANDBOX_URL): the SDK's control calls go to control,
// envd's and the guest's ports through the edge's token checks and the
// node's tunnel.
func TestClusterE2B(t *testing.T) {
	host := kilntest.Requirements(t, "cluster E2B", "busybox")
	if pg == nil {
		t.Skip("postgresql-15 is not installed: run make setup")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	npmErr := make(chan error, 1)
	go func() { npmErr <- kilntest.NpmInstall(ctx, host.Npm, kilntest.E2BDir, "e2b") }()
	c := newCluster(ctx, t, "kce2b")
	code, err := kilntest.E2BTemplateCode(c.work, host.Tools["busybox"])
	if err != nil {
		t.Fatal(err)
	}
	var live *awscli.Client
	defer func() { c.shutdown(live) }()

	// Control names the endpoints (and E2B's sandbox domain) with the
	// edge's port, as its clients reach them.
	edgeAddr := "127.0.0.1:" + kilntest.FreePort(t)
	ctl, apiURL := c.startControl(ctx, "control-a", "", "--endpoint-addr", edgeAddr)
	c.startNode(ctx, "node-a", c.hosts(1)[0], host.KernelDir, ctl.data)
	edgeP, _ := c.startEdge(ctx, ctl.data, edgeAddr)
	caFile := filepath.Join(edgeP.data, "ca.pem")
	// The data dir of the scripts' kiln CLI (cli.mjs, errors.mjs): an
	// operator's, with control's keys and the edge's endpoint CA; the
	// store comes from KILN_STORE.
	cliDir := c.dataDir("cli", ctl.data)
	if b, err := os.ReadFile(caFile); err != nil || os.WriteFile(filepath.Join(cliDir, "ca.pem"), b, 0o600) != nil {
		t.Fatalf("copying the edge's CA for the CLI: %v", err)
	}
	live = c.api(apiURL, ctl.data)

	t0 := time.Now()
	call(ctx, t, live, "CreateMicrovmImage", map[string]any{"name": kilntest.E2BTemplate, "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/build", "codeArtifact": map[string]any{"uri": kilntest.FileURI(code)},
		"resources": []any{map[string]any{"minimumMemoryInMiB": 512}}})
	img, err := awscli.Wait(ctx, live, awscli.Find("CreateMicrovmImage"), nil, map[string]any{"name": kilntest.E2BTemplate, "imageVersion": "1"}, io.Discard)
	if err != nil || img["state"] != "CREATED" {
		t.Fatalf("template image: %v %v", img, err)
	}
	t.Logf("template built on the node in %v", time.Since(t0).Round(100*time.Millisecond))
	// arn:aws:lambda:REGION:ACCOUNT:microvm-image:NAME
	admin := strings.Split(img["imageArn"].(string), ":")[4]

	// The CLI reaches the cluster's store as the roles do.
	global := []string{"--data-dir", cliDir, "--store", c.storeURL}
	key, otherKey := kilntest.E2BKey(ctx, t, c.kiln, global, "--account", admin), kilntest.E2BKey(ctx, t, c.kiln, global)
	if err := <-npmErr; err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(),
		"E2B_API_KEY="+key,
		"E2B_API_URL="+apiURL,
		"E2B_SANDBOX_URL=https://"+edgeAddr,
		"E2B_DOMAIN=microvm.localhost",
		"NODE_EXTRA_CA_CERTS="+caFile,
		"KILN_TEMPLATE="+kilntest.E2BTemplate,
		"KILN_OTHER_KEY="+otherKey,
		"KILN_SANDBOX_ID_FILE="+filepath.Join(c.work, "sandbox-id"),
		"KILN_BIN="+c.kiln,
		"KILN_DATA_DIR="+cliDir,
		"KILN_STORE="+c.storeURL,
	)
	// The scripts that take the cluster's own paths (control's E2B API
	// and its RPCs to the node, the edge's wake and checks, the CLI
	// through the edge). resume.mjs and snapshots.mjs pass too, but add
	// about 25 s (KILN_E2B_SCRIPTS names any, "all" every one);
	// templates.mjs needs the debian-12 base on the node and minutes.
	scripts := strings.Fields(os.Getenv("KILN_E2B_SCRIPTS"))
	if len(scripts) == 1 && scripts[0] == "all" {
		scripts = nil
	} else if len(scripts) == 0 {
		scripts = []string{"e2b.mjs", "files.mjs", "pty.mjs", "autoresume.mjs", "cli.mjs", "control.mjs", "errors.mjs", "tags.mjs"}
	}
	t0 = time.Now()
	kilntest.RunE2BScripts(ctx, t, host.Node, env, scripts...)
	t.Logf("the SDK scripts took %v", time.Since(t0).Round(100*time.Millisecond))

	// e2b.mjs's sandbox was a microVM of the key's account, placed on the
	// node, and ended by sandbox.kill().
	if id, err := os.ReadFile(filepath.Join(c.work, "sandbox-id")); err == nil {
		m := c.record(ctx, string(id))
		if m.Account != admin || m.Node != "node-a" || (m.State != store.StateTerminated && m.State != store.StateTerminating) {
			t.Errorf("sandbox %s: account %s, node %s, %s; want %s, node-a, TERMINATED", id, m.Account, m.Node, m.State, admin)
		}
	} else if slices.Contains(scripts, "e2b.mjs") || scripts == nil {
		t.Errorf("e2b.mjs recorded no sandbox: %v", err)
	}
}
