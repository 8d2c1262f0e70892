package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/qemu"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// runHelper starts the real `kiln server` (test binary re-executed) and
// stops it with SIGTERM at the end of the test.
func runHelper(t *testing.T, dir string, env ...string) (addr, url, line string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts server processes")
	}
	addr = freeAddr(t)
	cmd, line := startServerLine(t, dir, addr, env...)
	t.Cleanup(func() { stopHelper(cmd) })
	return addr, strings.Fields(line[strings.Index(line, "http"):])[0], line
}

func stopHelper(cmd *exec.Cmd) {
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func opts(t *testing.T, o map[string]any) string {
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return "KILN_HELPER_OPTS=" + string(b)
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatalf("stat %s: %v", p, err)
	}
	return fi.Mode().Perm()
}

// TestServerFileModes: after a real `kiln server` start, DATA_DIR is 0700
// and the database (with its WAL and SHM) and every key file are 0600,
// including a data directory and a key file an older kiln or a careless
// copy left readable.
func TestServerFileModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A token key left world-readable.
	if err := os.WriteFile(filepath.Join(dir, "token.key"), bytes.Repeat([]byte{1}, 32), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "token.key"), 0o644)
	runHelper(t, dir)
	if m := mode(t, dir); m != 0o700 {
		t.Errorf("DATA_DIR mode %v, want 0700", m)
	}
	for _, f := range []string{"kiln.db", "kiln.db-wal", "kiln.db-shm", "credentials", "secrets.key", "token.key"} {
		if m := mode(t, filepath.Join(dir, f)); m != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, m)
		}
	}
}

// TestStolenDatabaseHoldsNoSecret: a copy of kiln.db, its WAL and SHM,
// taken while the server runs, holds neither the admin's secret nor a
// tenant's in clear; the server still authenticates both.
func TestStolenDatabaseHoldsNoSecret(t *testing.T) {
	dir := t.TempDir()
	_, url, _ := runHelper(t, dir)
	ctx := context.Background()
	admin, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	// `kiln keys create`, while the server runs.
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	tenant, err := auth.NewAccessKey("222222222222", "tenant")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAccessKey(ctx, tenant); err != nil {
		t.Fatal(err)
	}
	st.Close()
	for _, c := range []auth.Credentials{admin, {AccessKeyID: tenant.ID, SecretAccessKey: tenant.Secret}} {
		if _, err := awscli.Call(ctx, awscli.NewClient(url, "us-east-1", c), awscli.Find("ListMicrovms"), map[string]any{}); err != nil {
			t.Fatalf("ListMicrovms as %s: %v", c.AccessKeyID, err)
		}
	}
	var stolen []byte
	for _, f := range []string{"kiln.db", "kiln.db-wal", "kiln.db-shm"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		stolen = append(stolen, b...)
	}
	if !bytes.Contains(stolen, []byte(tenant.ID)) {
		t.Fatal("the copy does not even hold the key ids: wrong files?")
	}
	for name, sec := range map[string]string{"admin": admin.SecretAccessKey, "tenant": tenant.Secret} {
		if bytes.Contains(stolen, []byte(sec)) {
			t.Errorf("a copy of kiln.db holds the %s secret in clear", name)
		}
	}
}

// TestOperatorKeyDeletionPromotesNobody: the operator is the admin
// account recorded on first start. A tenant may not build from a host
// path, not even after the operator's key is deleted and the server
// restarted (it used to become "the oldest key"); the operator, with a new
// key, still may.
func TestOperatorKeyDeletionPromotesNobody(t *testing.T) {
	if testing.Short() {
		t.Skip("starts server processes")
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	srv, url := startServer(t, dir, addr)
	ctx := context.Background()
	admin, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	adminKey, err := st.GetAccessKey(ctx, admin.AccessKeyID)
	if err != nil {
		t.Fatal(err)
	}
	tenant, _ := auth.NewAccessKey("222222222222", "tenant")
	if err := st.CreateAccessKey(ctx, tenant); err != nil {
		t.Fatal(err)
	}
	build := func(url string, c auth.Credentials, name string) error {
		_, err := awscli.Call(ctx, awscli.NewClient(url, "us-east-1", c), awscli.Find("CreateMicrovmImage"), map[string]any{
			"name": name, "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
			"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]any{"uri": "file:///etc"}})
		return err
	}
	tc := auth.Credentials{AccessKeyID: tenant.ID, SecretAccessKey: tenant.Secret}
	if err := build(url, tc, "t1"); err == nil || !strings.Contains(err.Error(), "ValidationException") {
		t.Fatalf("a tenant built from a host path: %v", err)
	}
	if err := build(url, admin, "a1"); err != nil {
		t.Fatalf("the operator may build from a host path: %v", err)
	}
	// `kiln keys delete` of the operator's only key, then a restart.
	if err := st.DeleteAccessKey(ctx, admin.AccessKeyID); err != nil {
		t.Fatal(err)
	}
	stopHelper(srv)
	srv, url = startServer(t, dir, addr)
	defer stopHelper(srv)
	if err := build(url, tc, "t2"); err == nil || !strings.Contains(err.Error(), "ValidationException") {
		t.Fatalf("after the operator's key was deleted, the tenant (now the oldest key) built from a host path: %v", err)
	}
	// A new key of the operator's account keeps the privilege.
	k2, _ := auth.NewAccessKey(adminKey.Account, "operator again")
	if err := st.CreateAccessKey(ctx, k2); err != nil {
		t.Fatal(err)
	}
	st.Close()
	if err := build(url, auth.Credentials{AccessKeyID: k2.ID, SecretAccessKey: k2.Secret}, "a2"); err != nil {
		t.Fatalf("the operator's new key: %v", err)
	}
}

// TestOperatorAccountFlag: --operator-account names the operator instead
// of the recorded admin account.
func TestOperatorAccountFlag(t *testing.T) {
	dir := t.TempDir()
	_, url, _ := runHelper(t, dir, opts(t, map[string]any{"OperatorAccount": "333333333333"}))
	ctx := context.Background()
	admin, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	st, err := openStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	op, _ := auth.NewAccessKey("333333333333", "named operator")
	if err := st.CreateAccessKey(ctx, op); err != nil {
		t.Fatal(err)
	}
	st.Close()
	in := map[string]any{"name": "x", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]any{"uri": "file:///etc"}}
	if _, err := awscli.Call(ctx, awscli.NewClient(url, "us-east-1", admin), awscli.Find("CreateMicrovmImage"), in); err == nil {
		t.Error("the recorded admin built from a host path while --operator-account names another account")
	}
	if _, err := awscli.Call(ctx, awscli.NewClient(url, "us-east-1", auth.Credentials{AccessKeyID: op.ID, SecretAccessKey: op.Secret}), awscli.Find("CreateMicrovmImage"), in); err != nil {
		t.Errorf("--operator-account's account: %v", err)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key (0600) to dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kiln test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "api.pem"), filepath.Join(dir, "api.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestAPIOverTLS: with --api-cert and --api-key the API serves HTTPS;
// kiln's CLI client (the AWS SDK's SigV4 signer) works over it, uploads
// included, and plain HTTP gets no API answer.
func TestAPIOverTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, t.TempDir())
	addr, url, line := runHelper(t, dir, opts(t, map[string]any{"APICert": certFile, "APIKey": keyFile}))
	if !strings.HasPrefix(url, "https://") {
		t.Fatalf("start-up line %q", line)
	}
	creds, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	c := awscli.NewClient(url, "us-east-1", creds)
	c.HTTP = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	ctx := context.Background()
	if _, err := awscli.Call(ctx, c, awscli.Find("ListMicrovms"), map[string]any{}); err != nil {
		t.Fatalf("ListMicrovms over TLS: %v", err)
	}
	// A large body goes through the header-first path over TLS too.
	big := map[string]any{"name": "tls", "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12",
		"buildRoleArn": "arn:aws:iam::123456789012:role/b", "codeArtifact": map[string]any{"uri": "s3://b/k.zip"},
		"description": strings.Repeat("d", 100<<10)}
	_, err = awscli.Call(ctx, c, awscli.Find("CreateMicrovmImage"), big)
	var ae *awscli.APIError
	if err != nil && (!errors.As(err, &ae) || ae.Type != "ValidationException") {
		t.Fatalf("a signed 100 KiB body: %v", err)
	}
	zip := []byte("PK\x05\x06" + strings.Repeat("\x00", 18))
	sum := sha256hex(zip)
	if _, err := c.Upload(ctx, bytes.NewReader(zip), int64(len(zip)), sum); err != nil {
		t.Fatalf("upload over TLS: %v", err)
	}
	resp, err := http.Get("http://" + addr + "/kiln/v1/info")
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Errorf("plain HTTP answered on a TLS API: %s", b)
		}
	}
}

// rawRequest sends head (request line and headers, no body) on a fresh
// connection and returns the status line and how long the answer took.
func rawRequest(t *testing.T, addr, head string) (string, time.Duration) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, head); err != nil {
		t.Fatal(err)
	}
	status, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("no answer within 10 s (is the server waiting for the body?): %v", err)
	}
	return strings.TrimSpace(status), time.Since(start)
}

// TestLargeBodyAuthenticatedBeforeRead: a request that claims a 100 MB
// body and is not validly signed is refused at once, before the server
// reads a byte of the body (the client sends none): without a signed
// X-Amz-Content-Sha256 a body over 64 KiB is refused outright, and with
// one the signature is checked from the headers.
func TestLargeBodyAuthenticatedBeforeRead(t *testing.T) {
	dir := t.TempDir()
	addr, _, _ := runHelper(t, dir)
	creds, err := auth.ReadCredentials(filepath.Join(dir, "credentials"), "default")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	authz := fmt.Sprintf("AWS4-HMAC-SHA256 Credential=%s/%s/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=%s",
		creds.AccessKeyID, now.Format("20060102"), strings.Repeat("0", 64))
	// 100 MB is over the 6 MiB bound of API bodies; 5 MB and 1 MB are not,
	// and a server that reads before it verifies waits for them.
	hash := "X-Amz-Content-Sha256: " + strings.Repeat("a", 64) + "\r\n"
	for _, tc := range []struct {
		name, path, extra, want string
		length                  int
	}{
		{"100 MB", "/2025-09-09/microvm-images", "", " 413 ", 100_000_000},
		{"1 MB without hash header", "/2025-09-09/microvm-images", "", " 413 ", 1_000_000},
		{"5 MB with hash header, bad signature", "/2025-09-09/microvm-images", hash, " 403 ", 5_000_000},
		{"100 MB upload, bad signature", api.ArtifactPath, hash, " 403 ", 100_000_000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			method := "POST"
			if tc.path == api.ArtifactPath {
				method = "PUT"
			}
			head := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Amz-Date: %s\r\nAuthorization: %s\r\n%s\r\n",
				method, tc.path, addr, tc.length, now.Format("20060102T150405Z"), authz, tc.extra)
			status, took := rawRequest(t, addr, head)
			if !strings.Contains(status+" ", tc.want) {
				t.Errorf("status %q, want%s", status, tc.want)
			}
			if took > 3*time.Second {
				t.Errorf("answered after %v", took)
			}
		})
	}
	// A validly signed large body (kiln's CLI signs its hash) still works.
	c := awscli.NewClient("http://"+addr, "us-east-1", creds)
	_, err = awscli.Call(context.Background(), c, awscli.Find("CreateMicrovmImage"), map[string]any{"name": "big",
		"baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian-12", "buildRoleArn": "arn:aws:iam::123456789012:role/b",
		"codeArtifact": map[string]any{"uri": "s3://b/k.zip"}, "description": strings.Repeat("d", 100<<10)})
	var ae *awscli.APIError
	if err != nil && (!errors.As(err, &ae) || ae.Type != "ValidationException") {
		t.Fatalf("a signed 100 KiB body was not authenticated: %v", err)
	}
}

// TestHeaderCap: request headers beyond the cap are refused with 431.
func TestHeaderCap(t *testing.T) {
	addr, _, _ := runHelper(t, t.TempDir())
	head := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nX-Pad: %s\r\n\r\n", api.InfoPath, addr, strings.Repeat("p", 100<<10))
	if status, _ := rawRequest(t, addr, head); !strings.Contains(status, " 431 ") {
		t.Errorf("100 KiB of headers: %q, want 431", status)
	}
	head = fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", api.InfoPath, addr)
	if status, _ := rawRequest(t, addr, head); !strings.Contains(status, " 200 ") {
		t.Errorf("a small request: %q", status)
	}
}

// TestConnCapPerAddress: beyond --max-conns-per-client connections from
// one address, a new one is answered 429 with a clear message and closed;
// once one closes, connections are served again.
func TestConnCapPerAddress(t *testing.T) {
	addr, _, _ := runHelper(t, t.TempDir(), opts(t, map[string]any{"MaxConnsPerClient": 3}))
	var held []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	time.Sleep(200 * time.Millisecond) // let the server accept them
	get := func() (int, string) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", api.InfoPath, addr)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	if code, body := get(); code != 429 || !strings.Contains(body, "too many concurrent connections") {
		t.Errorf("connection over the cap: %d %s", code, body)
	}
	held[0].Close()
	held = held[1:]
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, body := get()
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after closing one connection: %d %s", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRequireKVMRefusesUnderTCG: on a host where the engine would choose
// TCG, `kiln server --require-kvm` refuses to start, saying why.
func TestRequireKVMRefusesUnderTCG(t *testing.T) {
	accel, why, err := qemu.ResolveAccel("auto")
	if err != nil {
		t.Fatal(err)
	}
	if accel == vmm.AccelKVM {
		t.Skip("this host has a usable KVM: --require-kvm starts here")
	}
	t.Logf("this host: %s (%s)", accel, why)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = server.Run(ctx, server.Options{Backend: "engine", DataDir: dir, APIAddr: freeAddr(t), EndpointAddr: freeAddr(t), Domain: "microvm.localhost", RequireKVM: true})
	if err == nil || !strings.Contains(err.Error(), "--require-kvm") || !strings.Contains(err.Error(), "not a security boundary") {
		t.Fatalf("kiln server --require-kvm under %s: %v", accel, err)
	}
	// The fake backend runs no VMs at all: refused too.
	err = server.Run(ctx, server.Options{Backend: "fake", DataDir: dir, APIAddr: freeAddr(t), RequireKVM: true})
	if err == nil || !strings.Contains(err.Error(), "--require-kvm") {
		t.Fatalf("--require-kvm with the fake backend: %v", err)
	}
}

func getInfo(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url + api.InfoPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info map[string]string
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", api.InfoPath, resp.StatusCode, err)
	}
	return info
}

// TestInfoFakeBackend: the info answer needs no signature and says that
// no VMs run.
func TestInfoFakeBackend(t *testing.T) {
	_, url, line := runHelper(t, t.TempDir())
	if info := getInfo(t, url); info["accel"] != "none" {
		t.Errorf("info = %v", info)
	}
	if !strings.Contains(line, "(fake backend") {
		t.Errorf("start-up line %q", line)
	}
}

// TestEngineInfoReportsTCG starts the real server with the VM engine: on
// a TCG host its start-up line and GET /kiln/v1/info say that TCG is not
// a security boundary, and the key files the engine makes (endpoint CA,
// token key) are 0600.
func TestEngineInfoReportsTCG(t *testing.T) {
	if testenv.Short() {
		t.Skip("-short: the engine needs root and VMs")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("in CI the engine test must run as root")
		}
		t.Skip("the engine needs root")
	}
	accel, _, err := qemu.ResolveAccel("auto")
	if err != nil {
		t.Fatal(err)
	}
	env := vmmtest.SetupOrSkip("cmd/kiln")
	if env == nil {
		t.Skip("no engine set-up (make setup)")
	}
	defer env.Cleanup()
	// Unix socket paths under DATA_DIR must stay short.
	dir, err := os.MkdirTemp("", "kinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Symlink(env.KernelDir, filepath.Join(dir, "kernel")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o700); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(env.AgentBinary)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "kiln-agent"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	_, url, line := runHelper(t, dir, "KILN_HELPER_BACKEND=engine", opts(t, map[string]any{"EndpointAddr": freeAddr(t)}))
	info := getInfo(t, url)
	if info["accel"] != string(accel) {
		t.Errorf("info = %v, host accel %s", info, accel)
	}
	if accel == vmm.AccelTCG {
		if info["isolation"] != "not a security boundary" {
			t.Errorf("info = %v", info)
		}
		if !strings.Contains(line, "(accel tcg: not a security boundary)") {
			t.Errorf("start-up line %q", line)
		}
	} else if info["isolation"] != "kvm" {
		t.Errorf("info = %v", info)
	}
	if m := mode(t, dir); m != 0o700 {
		t.Errorf("DATA_DIR mode %v", m)
	}
	for _, f := range []string{"kiln.db", "credentials", "secrets.key", "token.key", "tls/ca.key", "tls/leaf.key"} {
		if m := mode(t, filepath.Join(dir, f)); m != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, m)
		}
	}
}

func sha256hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
