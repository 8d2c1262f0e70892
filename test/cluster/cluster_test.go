//go:build linux

// Package cluster runs kiln as a cluster on one machine: a private
// PostgreSQL, two `kiln control` replicas, `kiln node`s with real QEMU
// microVMs and an edge, each a separate process with its own data
// directory and cluster certificate, talking over gRPC with mutual TLS.
// It checks the failure rules of docs/CLUSTER.md by killing and stopping
// those processes.
package cluster

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/postgres"
	"github.com/kiln-sandbox/kiln/internal/store/postgres/pgtest"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

var pg *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(pgtest.Run(func(c *pgtest.Cluster, skip string) int {
		pg = c
		return m.Run()
	}))
}

// proc is one kiln role process.
type proc struct {
	name, data, log string
	cmd             *exec.Cmd
	exited          chan struct{}
}

// start runs kiln with args, its output in a file, and waits for ready
// to appear in it.
func start(ctx context.Context, t *testing.T, kiln, name, data, ready string, args ...string) *proc {
	t.Helper()
	return startCmd(ctx, t, kiln, name, data, ready, append([]string{"--data-dir", data}, args...)...)
}

// startCmd is start for any command line (nsenter, for a node in its
// own network namespace).
func startCmd(ctx context.Context, t *testing.T, prog, name, data, ready string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, data: data, log: filepath.Join(filepath.Dir(data), name+".log"), exited: make(chan struct{})}
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p.cmd = exec.Command(prog, args...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	for end := time.Now().Add(90 * time.Second); ; {
		b, _ := os.ReadFile(p.log)
		if bytes.Contains(b, []byte(ready)) {
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("%s exited before it was ready:\n%s", name, b)
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(end) {
			t.Fatalf("%s not ready within 90s:\n%s", name, b)
		}
	}
}

func (p *proc) stop(t *testing.T) {
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("%s did not stop within 30s of SIGTERM", p.name)
		p.cmd.Process.Kill()
		<-p.exited
	}
}

func (p *proc) kill() {
	p.cmd.Process.Kill()
	<-p.exited
}

func (p *proc) dumpLog(t *testing.T) {
	b, _ := os.ReadFile(p.log)
	if len(b) > 64<<10 {
		b = b[len(b)-64<<10:]
	}
	t.Logf("%s log (tail):\n%s", p.name, b)
}

type clusterEnv struct {
	t        *testing.T
	kiln     string
	work     string
	caDir    string
	storeURL string
	db       *postgres.Store
	procs    []*proc
}

func (c *clusterEnv) issue(role, name string, hosts ...string) (ca, cert, key string) {
	c.t.Helper()
	out := filepath.Join(c.work, "certs", name)
	args := []string{"cluster-ca", "issue", "--dir", c.caDir, "--role", role, "--name", name, "--out", out}
	for _, h := range append(hosts, "127.0.0.1") {
		args = append(args, "--host", h)
	}
	if b, err := exec.Command(c.kiln, args...).CombinedOutput(); err != nil {
		c.t.Fatalf("issuing %s: %v\n%s", name, err, b)
	}
	return filepath.Join(out, "ca.crt"), filepath.Join(out, "tls.crt"), filepath.Join(out, "tls.key")
}

func (c *clusterEnv) clusterArgs(role, name string, hosts ...string) []string {
	ca, cert, key := c.issue(role, name, hosts...)
	return []string{"--store", c.storeURL, "--cluster-ca", ca, "--cluster-cert", cert, "--cluster-key", key}
}

// dataDir makes a role's data directory; shared keys (the sealing key of
// access keys, the endpoint token key) are copied from first.
func (c *clusterEnv) dataDir(name string, shareFrom string) string {
	d := filepath.Join(c.work, name, "d")
	if err := os.MkdirAll(d, 0o700); err != nil {
		c.t.Fatal(err)
	}
	if shareFrom != "" {
		for _, f := range []string{"secrets.key", "token.key", "credentials"} {
			b, err := os.ReadFile(filepath.Join(shareFrom, f))
			if err != nil {
				c.t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, f), b, 0o600); err != nil {
				c.t.Fatal(err)
			}
		}
	}
	return d
}

// host is a network namespace standing in for a machine: its own
// address on a bridge in the test's namespace, where control, the edge
// and PostgreSQL's socket are.
type host struct {
	ns, addr string
	n        int
}

// hosts makes n stand-in hosts on a bridge, removed at cleanup. Names
// and the subnet are new each run: a namespace outlives its deletion
// while the kernel still holds sockets of it (connections to a killed
// node retransmit for minutes), and with it its end of the bridge link.
func (c *clusterEnv) hosts(n int) []host {
	c.t.Helper()
	run := func(args ...string) {
		if b, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			c.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	tag := rand.IntN(1 << 16)
	subnet := fmt.Sprintf("10.250.%d", 1+tag%250)
	bridge := fmt.Sprintf("kclbr%04x", tag)
	run("link", "add", bridge, "type", "bridge")
	c.t.Cleanup(func() { exec.Command("ip", "link", "del", bridge).Run() })
	run("addr", "add", subnet+".1/24", "dev", bridge)
	run("link", "set", bridge, "up")
	// This namespace routes for the hosts, so it forwards. kiln turns
	// forwarding on in the namespaces it runs in (the hosts'), not here;
	// that it was on here came from kiln processes of earlier test
	// packages whose leaked networks kept them from turning it off.
	const forward = "/proc/sys/net/ipv4/ip_forward"
	if was, err := os.ReadFile(forward); err == nil && strings.TrimSpace(string(was)) != "1" {
		if err := os.WriteFile(forward, []byte("1"), 0o644); err != nil {
			c.t.Fatalf("turning forwarding on for the hosts: %v", err)
		}
		c.t.Cleanup(func() { os.WriteFile(forward, was, 0o644) })
	}
	// What the hosts send elsewhere leaves with this namespace's address,
	// as a machine's traffic leaves its network: a stand-in of the
	// internet (control.mjs's) answers that, not a host it has no route to.
	table := fmt.Sprintf("kcl%04x", tag)
	nat := exec.Command("nft", "-f", "-")
	nat.Stdin = strings.NewReader(fmt.Sprintf("table ip %s {\n chain post {\n type nat hook postrouting priority srcnat; policy accept;\n"+
		" ip saddr %s.0/24 oifname != %q masquerade\n }\n}\n", table, subnet, bridge))
	if b, err := nat.CombinedOutput(); err != nil {
		c.t.Fatalf("nft: the hosts' NAT: %v\n%s", err, b)
	}
	c.t.Cleanup(func() { exec.Command("nft", "delete", "table", "ip", table).Run() })
	var hs []host
	for i := 0; i < n; i++ {
		h := host{ns: fmt.Sprintf("kcl-%04x-h%d", tag, i), addr: fmt.Sprintf("%s.%d", subnet, 10+i), n: i}
		run("netns", "add", h.ns)
		c.t.Cleanup(func() { exec.Command("ip", "netns", "del", h.ns).Run() })
		veth := fmt.Sprintf("kcl%04xv%d", tag, i)
		run("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
		run("link", "set", veth, "master", bridge, "up")
		run("-n", h.ns, "addr", "add", h.addr+"/24", "dev", "eth0")
		run("-n", h.ns, "link", "set", "eth0", "up")
		run("-n", h.ns, "link", "set", "lo", "up")
		run("-n", h.ns, "route", "add", "default", "via", subnet+".1")
		hs = append(hs, h)
	}
	return hs
}

// startNode runs `kiln node` in h's namespace, with its own data
// directory, VM network pool and VM uid range.
func (c *clusterEnv) startNode(ctx context.Context, name string, h host, kernelDir, shareFrom string, extra ...string) *proc {
	d := c.dataDir(name, shareFrom)
	os.Symlink(kernelDir, filepath.Join(d, "kernel"))
	args := append([]string{"--net=/run/netns/" + h.ns, "--", c.kiln, "--data-dir", d, "node", "--node-name", name,
		"--grpc-addr", h.addr + ":7070", "--tunnel-addr", h.addr + ":7071",
		"--net-pool", fmt.Sprintf("10.%d.0.0/16", 201+h.n), "--vm-uid-base", fmt.Sprint(0x6c000000 + h.n*0x10000),
		"--metrics-addr", "", "--clone-pool", "0", "--node-lease", "3s"}, c.clusterArgs("node", name, h.addr)...)
	p := startCmd(ctx, c.t, "nsenter", name, d, "kiln node "+name+" serving", append(args, extra...)...)
	c.procs = append(c.procs, p)
	waitFor(ctx, c.t, name+" registered", 30*time.Second, func() bool {
		n, err := c.db.GetNode(ctx, name)
		return err == nil && n.State == store.NodeActive && n.LeaseExpiresAt.After(time.Now())
	})
	return p
}

// startControl runs a control replica; extra are more of its flags.
func (c *clusterEnv) startControl(ctx context.Context, name, shareFrom string, extra ...string) (*proc, string) {
	d := c.dataDir(name, shareFrom)
	port := kilntest.FreePort(c.t)
	args := append([]string{"control", "--api-addr", "127.0.0.1:" + port, "--metrics-addr", "", "--gc-interval", "0",
		"--node-lease", "3s", "--node-grace", "5s"}, append(c.clusterArgs("control", name), extra...)...)
	p := start(ctx, c.t, c.kiln, name, d, kilntest.ReadyLine, args...)
	c.procs = append(c.procs, p)
	return p, "http://127.0.0.1:" + port
}

// api is a client of one control replica.
func (c *clusterEnv) api(apiURL, data string) *awscli.Client {
	creds, err := auth.ReadCredentials(filepath.Join(data, "credentials"), "default")
	if err != nil {
		c.t.Fatal(err)
	}
	return awscli.NewClient(apiURL, "us-east-1", creds)
}

func call(ctx context.Context, t *testing.T, cl *awscli.Client, op string, in map[string]any) map[string]any {
	t.Helper()
	out, err := awscli.Call(ctx, cl, awscli.Find(op), in)
	if err != nil {
		t.Fatalf("%s: %v", op, err)
	}
	return out
}

func waitFor(ctx context.Context, t *testing.T, what string, limit time.Duration, ok func() bool) {
	t.Helper()
	end := time.Now().Add(limit)
	for !ok() {
		if time.Now().After(end) || ctx.Err() != nil {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// record reads a microVM's record straight from the store.
func (c *clusterEnv) record(ctx context.Context, id string) store.Microvm {
	c.t.Helper()
	m, err := c.db.LocateMicrovm(ctx, id)
	if err != nil {
		c.t.Fatalf("reading %s from the store: %v", id, err)
	}
	return m
}

func (c *clusterEnv) state(ctx context.Context, cl *awscli.Client, id string) string {
	out, err := awscli.Call(ctx, cl, awscli.Find("GetMicrovm"), map[string]any{"microvmIdentifier": id})
	if err != nil {
		return "error: " + err.Error()
	}
	s, _ := out["state"].(string)
	return s
}

// startEdge runs `kiln edge` with control's token key, its endpoints
// at addr (a free port if ""), and returns it and that address.
func (c *clusterEnv) startEdge(ctx context.Context, controlData, addr string) (*proc, string) {
	d := c.dataDir("edge", "")
	if addr == "" {
		addr = "127.0.0.1:" + kilntest.FreePort(c.t)
	}
	args := append([]string{"edge", "--endpoint-addr", addr, "--metrics-addr", "", "--token-key", filepath.Join(controlData, "token.key")},
		c.clusterArgs("edge", "edge-a")...)
	p := start(ctx, c.t, c.kiln, "edge", d, "kiln edge serving", args...)
	c.procs = append(c.procs, p)
	return p, addr
}

// client returns a function that GETs / of a microVM's port 8080
// through the edge at addr, with a token made by a control replica.
func (c *clusterEnv) client(caFile, addr string) func(ctx context.Context, t *testing.T, cl *awscli.Client, id string) string {
	hc := c.edgeHTTP(caFile, addr)
	return func(ctx context.Context, t *testing.T, cl *awscli.Client, id string) string {
		tok, err := awscli.Call(ctx, cl, awscli.Find("CreateMicrovmAuthToken"), map[string]any{"microvmIdentifier": id,
			"expirationInMinutes": 10, "allowedPorts": []any{map[string]any{"port": 8080}}})
		if err != nil {
			return "token: " + err.Error()
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+id+".microvm.localhost/hello", nil)
		hdrs, _ := tok["authToken"].(map[string]any)
		for k, v := range hdrs {
			req.Header.Set(k, fmt.Sprint(v))
		}
		res, err := hc.Do(req)
		if err != nil {
			return "request: " + err.Error()
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		return fmt.Sprintf("%d %s", res.StatusCode, b)
	}
}

// edgeHTTP is an HTTPS client that sends every request to the edge at
// addr and trusts the endpoint CA in caFile.
func (c *clusterEnv) edgeHTTP(caFile, addr string) *http.Client {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}}
}

// events counts a microVM's lifecycle events into state.
func (c *clusterEnv) events(ctx context.Context, id string, state store.MicrovmState) int {
	evs, _, err := c.db.ListEvents(ctx, c.record(ctx, id).Account, store.EventFilter{Kind: store.EventMicrovm, Resource: id}, store.Page{Limit: 100})
	if err != nil {
		c.t.Fatal(err)
	}
	n := 0
	for _, e := range evs {
		if e.State == string(state) {
			n++
		}
	}
	return n
}

// terminateAll ends every microVM not TERMINATED, through cl, and waits.
func (c *clusterEnv) terminateAll(cl *awscli.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ms, err := c.db.ListMicrovmsInState(ctx, 0, store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating)
	if err != nil {
		c.t.Errorf("listing microVMs to terminate: %v", err)
		return
	}
	for _, m := range ms {
		awscli.Call(ctx, cl, awscli.Find("TerminateMicrovm"), map[string]any{"microvmIdentifier": m.ID})
	}
	for _, m := range ms {
		for ctx.Err() == nil && c.record(ctx, m.ID).State != store.StateTerminated {
			time.Sleep(250 * time.Millisecond)
		}
	}
}

// connectorARN prefixes the AWS network connectors' names.
const connectorARN = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:"

// exitCode is a finished command's exit status (-1 if it did not run).
func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}

// envdGet GETs path of microVM id's envd through the edge, with the envd
// token of microVM tokenFor minted under control's key, and returns
// "STATUS BODY".
func (c *clusterEnv) envdGet(ctx context.Context, caFile, edgeAddr, controlData, id, tokenFor, path string) string {
	key, err := os.ReadFile(filepath.Join(controlData, "token.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://49983-"+id+".microvm.localhost"+path, nil)
	req.Header.Set("X-Access-Token", e2b.NewEnvdTokens(key).Mint(c.record(ctx, tokenFor).Account, tokenFor))
	res, err := c.edgeHTTP(caFile, edgeAddr).Do(req)
	if err != nil {
		return "request: " + err.Error()
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	return fmt.Sprintf("%d %s", res.StatusCode, b)
}

// newCluster builds kiln and kiln-agent into a new work directory, makes
// a database on the package's PostgreSQL and the cluster CA. No role runs
// yet; the test defers shutdown.
func newCluster(ctx context.Context, t *testing.T, prefix string) *clusterEnv {
	t.Helper()
	work, bin, _ := kilntest.WorkDir(t, prefix)
	kiln := filepath.Join(bin, "kiln")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{{kiln, "./cmd/kiln", false}, {filepath.Join(bin, "kiln-agent"), "./cmd/kiln-agent", true}} {
		if err := kilntest.GoBuild(ctx, b.out, b.pkg, b.static); err != nil {
			t.Fatal(err)
		}
	}
	storeURL, err := pg.NewDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sl, err := seal.LoadOrCreate(filepath.Join(work, "test-secrets.key"))
	if err != nil {
		t.Fatal(err)
	}
	db, err := postgres.Open(ctx, storeURL, sl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c := &clusterEnv{t: t, kiln: kiln, work: work, caDir: filepath.Join(work, "ca"), storeURL: storeURL, db: db}
	if b, err := exec.Command(kiln, "cluster-ca", "init", "--dir", c.caDir).CombinedOutput(); err != nil {
		t.Fatalf("cluster-ca init: %v\n%s", err, b)
	}
	return c
}

// shutdown terminates every microVM through live (a control replica
// that still runs, if any), stops the roles, newest first, and fails the
// test for any QEMU process a node left.
func (c *clusterEnv) shutdown(live *awscli.Client) {
	t := c.t
	if live != nil {
		c.terminateAll(live)
	}
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop(t)
		if t.Failed() {
			c.procs[i].dumpLog(t)
		}
	}
	for _, p := range c.procs {
		if pids := kilntest.QemuOf(p.data); len(pids) > 0 {
			t.Errorf("QEMU processes of %s left after the cluster stopped: %v", p.name, pids)
			kilntest.KillQemuOf(t, p.data)
		}
	}
}

func TestCluster(t *testing.T) {
	host := kilntest.Requirements(t, "cluster")
	if pg == nil {
		t.Skip("postgresql-15 is not installed: run make setup")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	c := newCluster(ctx, t, "kcl")
	app := filepath.Join(c.work, "app")
	if err := kilntest.GoBuild(ctx, app, "./test/sdk/testdata/app", true); err != nil {
		t.Fatal(err)
	}
	code := filepath.Join(c.work, "app.zip")
	if err := kilntest.CodePackage(code, "FROM scratch\nCOPY app /app\nCMD [\"/app\"]\n", map[string]string{"app": app}); err != nil {
		t.Fatal(err)
	}
	db := c.db
	var live *awscli.Client // a control replica that still runs
	defer func() { c.shutdown(live) }()

	// Control A first: it makes the admin key, the sealing key and the
	// token key, which the other roles share.
	ctlA, urlA := c.startControl(ctx, "control-a", "")
	ctlB, urlB := c.startControl(ctx, "control-b", ctlA.data)
	hosts := c.hosts(3)
	nodeA := c.startNode(ctx, "node-a", hosts[0], host.KernelDir, ctlA.data, "--capacity-mib", "1536")
	nodeB := c.startNode(ctx, "node-b", hosts[1], host.KernelDir, ctlA.data, "--capacity-mib", "1536")
	edgeP, edgeAddr := c.startEdge(ctx, ctlA.data, "")
	a, b := c.api(urlA, ctlA.data), c.api(urlB, ctlA.data)
	live = b
	get := c.client(filepath.Join(edgeP.data, "ca.pem"), edgeAddr)

	// The code package is uploaded to replica A, and the image created
	// through replica B from what A answered: the upload is in the store
	// (kiln-upload://), read by a node whose data dir is neither's.
	t0 := time.Now()
	zipBytes, err := os.ReadFile(code)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(zipBytes)
	uploaded, err := a.Upload(ctx, bytes.NewReader(zipBytes), int64(len(zipBytes)), hex.EncodeToString(sum[:]))
	if err != nil || !strings.HasPrefix(uploaded, store.UploadScheme+"://") {
		t.Fatalf("upload through control-a: %q %v", uploaded, err)
	}
	call(ctx, t, b, "CreateMicrovmImage", map[string]any{"name": "app", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/build", "codeArtifact": map[string]any{"uri": uploaded},
		"resources": []any{map[string]any{"minimumMemoryInMiB": 512}}})
	img, err := awscli.Wait(ctx, a, awscli.Find("CreateMicrovmImage"), nil, map[string]any{"name": "app", "imageVersion": "1"}, io.Discard)
	if err != nil || img["state"] != "CREATED" {
		t.Fatalf("image: %v %v", img, err)
	}
	t.Logf("image uploaded to control-a, created through control-b, built in %v", time.Since(t0).Round(100*time.Millisecond))

	// Six microVMs of 512 MiB, created through either replica, fill both
	// nodes (1536 MiB each): placement spreads them, and the node that did
	// not build the image fetches its template. Two have an idle policy:
	// "idle" gets no traffic and must be suspended, "busy" gets requests
	// through the edge and must stay up.
	idle := map[string]any{"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 600, "autoResumeEnabled": true}
	var ids []string
	for i := 0; i < 6; i++ {
		in := map[string]any{"imageIdentifier": "app", "clientToken": fmt.Sprintf("run-%d", i)}
		if i >= 4 {
			in["idlePolicy"] = idle
		}
		if i == 1 {
			in["ingressNetworkConnectors"] = []any{connectorARN + "ALL_INGRESS", connectorARN + "SHELL_INGRESS"}
		}
		out := call(ctx, t, []*awscli.Client{a, b}[i%2], "RunMicrovm", in)
		ids = append(ids, out["microvmId"].(string))
	}
	idleVM, busyVM := ids[4], ids[5]
	perNode := map[string]int{}
	for _, id := range ids {
		waitFor(ctx, t, id+" RUNNING", 3*time.Minute, func() bool { return c.state(ctx, b, id) == "RUNNING" })
		perNode[c.record(ctx, id).Node]++
	}
	if perNode["node-a"] != 3 || perNode["node-b"] != 3 {
		t.Fatalf("placement: %v, want 3 on each node", perNode)
	}
	idleSince := time.Now()
	// A seventh does not fit anywhere: refused with the reason, nothing
	// over-committed.
	if _, err := awscli.Call(ctx, a, awscli.Find("RunMicrovm"), map[string]any{"imageIdentifier": "app"}); err == nil ||
		!strings.Contains(err.Error(), "no node can take 512 MiB") {
		t.Fatalf("a seventh microVM with both nodes full: %v", err)
	}
	for _, n := range []string{"node-a", "node-b"} {
		nd, err := db.GetNode(ctx, n)
		if err != nil || nd.CommittedMiB > nd.CapacityMiB {
			t.Fatalf("%s: %+v %v", n, nd, err)
		}
	}
	// Each answers through the edge, with a token from either replica.
	for i, id := range ids {
		if body := get(ctx, t, []*awscli.Client{a, b}[i%2], id); !strings.Contains(body, "hello") {
			t.Errorf("%s through the edge: %q", id, body)
		}
	}
	// The shell's port and envd's are served by the node that runs the
	// microVM, behind the edge's token checks: `kiln exec` with a shell
	// token from control, and an envd download with the envd token.
	caFile := filepath.Join(edgeP.data, "ca.pem")
	shellVM := ids[1]
	execOut, err := exec.CommandContext(ctx, c.kiln, "--data-dir", ctlA.data, "exec", "--endpoint-url", urlB, "--ca", caFile,
		"--connect-to", edgeAddr, "-n", shellVM, "--", "/app", "say", "out-42").Output()
	if code := exitCode(err); string(execOut) != "out-42\n" || code != 3 {
		t.Errorf("kiln exec through the edge: %q, exit %d (%v)", execOut, code, err)
	}
	if body := c.envdGet(ctx, caFile, edgeAddr, ctlA.data, shellVM, shellVM, "/files?path=/app&username=root"); !strings.HasPrefix(body, "200 ") {
		t.Errorf("envd through the edge: %q", body)
	}
	if body := c.envdGet(ctx, caFile, edgeAddr, ctlA.data, ids[2], shellVM, "/files?path=/app&username=root"); !strings.HasPrefix(body, "401 ") {
		t.Errorf("envd with another microVM's token: %q, want 401", body)
	}
	busyStop := make(chan struct{})
	busyDone := make(chan struct{})
	go func() {
		defer close(busyDone)
		for {
			select {
			case <-busyStop:
				return
			case <-time.After(5 * time.Second):
			}
			get(ctx, t, a, busyVM)
		}
	}()

	// Read, suspend, resume and terminate through the other replica.
	vm := ids[0]
	call(ctx, t, b, "SuspendMicrovm", map[string]any{"microvmIdentifier": vm})
	waitFor(ctx, t, "suspended", 2*time.Minute, func() bool { return c.state(ctx, a, vm) == "SUSPENDED" })
	call(ctx, t, a, "ResumeMicrovm", map[string]any{"microvmIdentifier": vm})
	waitFor(ctx, t, "resumed", 2*time.Minute, func() bool { return c.state(ctx, b, vm) == "RUNNING" })
	call(ctx, t, b, "TerminateMicrovm", map[string]any{"microvmIdentifier": vm})
	waitFor(ctx, t, "terminated", time.Minute, func() bool { return c.state(ctx, a, vm) == "TERMINATED" })

	// An expired microVM is terminated exactly once, by one replica.
	out := call(ctx, t, b, "RunMicrovm", map[string]any{"imageIdentifier": "app", "maximumDurationInSeconds": 20})
	short := out["microvmId"].(string)
	waitFor(ctx, t, "short-lived TERMINATED", 3*time.Minute, func() bool { return c.state(ctx, a, short) == "TERMINATED" })
	if n := c.events(ctx, short, store.StateTerminating); n != 1 {
		t.Errorf("the expired microVM went TERMINATING %d times, want once", n)
	}

	// Idle suspend and auto-resume through the edge: "idle" is suspended
	// by its node after its minute; "busy", with requests through the
	// edge, is not; a request to "idle" wakes it.
	waitFor(ctx, t, "idle microVM SUSPENDED", 3*time.Minute, func() bool { return c.state(ctx, a, idleVM) == "SUSPENDED" })
	t.Logf("the idle microVM was suspended %v after it started", time.Since(idleSince).Round(time.Second))
	close(busyStop)
	<-busyDone
	if s := c.state(ctx, a, busyVM); s != "RUNNING" || c.events(ctx, busyVM, store.StateSuspending) != 0 {
		t.Errorf("the microVM with traffic through the edge is %s (suspended %d times)", s, c.events(ctx, busyVM, store.StateSuspending))
	}
	woke := time.Now()
	if body := get(ctx, t, b, idleVM); !strings.Contains(body, "hello") {
		t.Errorf("the suspended microVM through the edge: %q", body)
	}
	t.Logf("auto-resume through the edge answered in %v", time.Since(woke).Round(time.Millisecond))
	if s := c.state(ctx, a, idleVM); s != "RUNNING" {
		t.Errorf("after a request through the edge the idle microVM is %s", s)
	}

	// SIGSTOP of a node longer than its lease but shorter than lease plus
	// grace: nothing terminated. 4 s: the lease (3 s, renewed every 1 s)
	// has run out, and the node has 3 s or more to renew on a busy host.
	nodeA.cmd.Process.Signal(syscall.SIGSTOP)
	time.Sleep(4 * time.Second)
	nodeA.cmd.Process.Signal(syscall.SIGCONT)
	time.Sleep(3 * time.Second)
	running := ids[1:]
	for _, id := range running {
		if s := c.state(ctx, a, id); s != "RUNNING" {
			t.Errorf("after node-a paused briefly, %s is %s", id, s)
		}
	}

	// PostgreSQL away for 60 s: no node is declared lost, and every
	// microVM answers afterwards.
	t.Logf("stopping PostgreSQL for 60s")
	if err := pg.Outage(ctx, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second) // longer than lease plus grace
	for _, n := range []string{"node-a", "node-b"} {
		if nd, err := db.GetNode(ctx, n); err != nil || nd.State != store.NodeActive {
			t.Errorf("after the store outage %s is %+v (%v)", n, nd.State, err)
		}
	}
	for _, id := range running {
		if body := get(ctx, t, a, id); !strings.Contains(body, "hello") {
			t.Errorf("%s after the store outage: %q", id, body)
		}
	}

	// SIGKILL of a node: its microVMs become TERMINATED (HostLost) within
	// lease plus grace.
	var onB []string
	for _, id := range running {
		if c.record(ctx, id).Node == "node-b" {
			onB = append(onB, id)
		}
	}
	killed := time.Now()
	nodeB.kill()
	for _, id := range onB {
		waitFor(ctx, t, id+" HostLost", 30*time.Second, func() bool {
			m := c.record(ctx, id)
			return m.State == store.StateTerminated && strings.HasPrefix(m.StateReason, store.ReasonHostLost)
		})
	}
	t.Logf("node-b's %d microVMs TERMINATED (HostLost) %v after its SIGKILL (lease 3s, grace 5s)", len(onB), time.Since(killed).Round(100*time.Millisecond))
	// The stand-in host is gone: what it ran goes with it.
	kilntest.KillQemuOf(t, nodeB.data)
	for _, id := range onB {
		netns.Teardown(ctx, id)
	}

	// A new node joins; then SIGKILL of control replica A in the middle of
	// a burst of RunMicrovm with client tokens: each token, retried on B,
	// makes exactly one microVM, and each of them runs.
	c.startNode(ctx, "node-c", hosts[2], host.KernelDir, ctlA.data, "--capacity-mib", "4096")
	before, err := db.ListMicrovmsInState(ctx, 0, store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating, store.StateTerminated)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	made := map[string]string{}
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			tok := fmt.Sprintf("burst-%d", i)
			in := map[string]any{"imageIdentifier": "app", "clientToken": tok}
			out, err := awscli.Call(ctx, a, awscli.Find("RunMicrovm"), in)
			if err != nil {
				out, err = awscli.Call(ctx, b, awscli.Find("RunMicrovm"), in)
			}
			if err != nil {
				t.Errorf("RunMicrovm %s on both replicas: %v", tok, err)
				return
			}
			mu.Lock()
			made[tok] = out["microvmId"].(string)
			mu.Unlock()
		}(i)
		if i == 2 {
			ctlA.kill()
		}
	}
	wg.Wait()
	for tok, id := range made {
		again := call(ctx, t, b, "RunMicrovm", map[string]any{"imageIdentifier": "app", "clientToken": tok})
		if again["microvmId"] != id {
			t.Errorf("token %s made %s and then %v", tok, id, again["microvmId"])
		}
		waitFor(ctx, t, "burst microVM "+id+" RUNNING", 2*time.Minute, func() bool { return c.state(ctx, b, id) == "RUNNING" })
	}
	after, err := db.ListMicrovmsInState(ctx, 0, store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating, store.StateTerminated)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(after) - len(before); n != len(made) || len(made) != 6 {
		t.Errorf("the burst of 6 tokens made %d microVM records (%d answered), want 6", n, len(made))
	}
	_ = ctlB
}
