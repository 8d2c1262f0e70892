//go:build linux

package sdk

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kiln-sandbox/kiln/internal/image/source"
	"github.com/kiln-sandbox/kiln/test/kilntest"
)

// s3Server is a real S3-compatible server (versitygw, installed by
// scripts/setup.sh) with its posix backend in a temporary folder: the
// store `kiln server --s3-endpoint` reads s3:// code artifacts from.
type s3Server struct {
	Endpoint  string
	AccessKey string
	SecretKey string
}

// Config is how a Go client reaches the store.
func (s *s3Server) Config() source.S3Config {
	return source.S3Config{Endpoint: s.Endpoint, AccessKeyID: s.AccessKey, SecretAccessKey: s.SecretKey}
}

// Env is the standard AWS chain's view of the store's root credentials.
func (s *s3Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey, "AWS_SESSION_TOKEN="}
}

// startS3 starts versitygw on a free loopback port with a fresh root key,
// stopped when the test ends. Outside CI it skips when versitygw is
// missing; in CI it fails.
func startS3(ctx context.Context, t *testing.T, dir string) *s3Server {
	t.Helper()
	bin, err := exec.LookPath("versitygw")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("in CI the S3 test must run, but versitygw is not installed (scripts/setup.sh installs it)")
		}
		t.Skip("versitygw is not installed: run `make setup`")
	}
	root := filepath.Join(dir, "s3")
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 20)
	rand.Read(key)
	s := &s3Server{AccessKey: "KILNTEST" + hex.EncodeToString(key[:6]), SecretKey: hex.EncodeToString(key)}
	addr := "127.0.0.1:" + kilntest.FreePort(t)
	s.Endpoint = "http://" + addr
	logPath := filepath.Join(dir, "versitygw.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "--access", s.AccessKey, "--secret", s.SecretKey, "--port", addr, "posix", root)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	for end := time.Now().Add(30 * time.Second); ; {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return s
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("versitygw exited before serving:\n%s", b)
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(end) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("versitygw did not listen on %s within 30s:\n%s", addr, b)
		}
	}
}

// put creates bucket (if new) and uploads the file at path as key,
// returning its s3:// URI.
func (s *s3Server) put(ctx context.Context, bucket, key, path string) (string, error) {
	c := source.NewS3Client(s.Config())
	if _, err := c.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(bucket)}); err != nil {
		if _, err := c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(bucket)}); err != nil {
			return "", fmt.Errorf("creating bucket %s: %w", bucket, err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: f}); err != nil {
		return "", fmt.Errorf("uploading s3://%s/%s: %w", bucket, key, err)
	}
	return "s3://" + bucket + "/" + key, nil
}

// checkCredentials reads the credentials JSON a guest got from its
// metadata service and reads bucket/key with them; the same keys with a
// wrong secret must be refused, so the acceptance means something.
func (s *s3Server) checkCredentials(ctx context.Context, t *testing.T, path, bucket, key string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the guest's credentials: %v", err)
	}
	var c struct{ AccessKeyId, SecretAccessKey, Token string }
	if err := json.Unmarshal(b, &c); err != nil || c.AccessKeyId == "" {
		t.Fatalf("the guest's credentials %s: %v", b, err)
	}
	head := func(secret string) error {
		cfg := source.S3Config{Endpoint: s.Endpoint, AccessKeyID: c.AccessKeyId, SecretAccessKey: secret, SessionToken: c.Token}
		_, err := source.NewS3Client(cfg).HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
		return err
	}
	if err := head(c.SecretAccessKey); err != nil {
		t.Errorf("S3 refused a request signed with the guest's role credentials: %v", err)
	}
	if err := head(c.SecretAccessKey + "x"); err == nil {
		t.Errorf("S3 accepted a wrong secret: the check above proves nothing")
	}
	t.Logf("a request signed with the credentials from the guest's metadata service was accepted by the S3 store")
}
