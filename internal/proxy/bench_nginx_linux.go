//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// benchNginx is nginx from Debian run by the benchmark as kiln's peer: a
// TLS reverse proxy on loopback with keep-alive to the same backend, its
// own config, pid file and logs in dir, never the system service.
type benchNginx struct {
	cmd  *exec.Cmd
	addr string
	done chan error
	dir  string
}

// nginxBinary finds nginx: the option, else PATH, else Debian's place
// (root's PATH may lack /usr/sbin).
func nginxBinary(path string) (string, error) {
	if path != "" {
		return path, nil
	}
	if p, err := exec.LookPath("nginx"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
		return "/usr/sbin/nginx", nil
	}
	return "", fmt.Errorf("nginx not found (the proxy benchmark compares kiln with it; `make setup` installs it): %w", errdefs.ErrNotFound)
}

// nginxConfig is the peer's configuration: what a user would write to
// put nginx in front of an app, tuned as a fair opponent (no access log,
// upstream keep-alive, unlimited requests per connection like Go's
// server) and with TLS pinned to what kiln negotiates with Go clients:
// ECDSA P-256 certificate, X25519, TLS 1.3 with AES-128-GCM. It also sets
// the forwarding headers kiln sets and blanks the token header, so both
// proxies do comparable header work.
func nginxConfig(dir, listen, backend, chain, key string, workers int) string {
	p := func(name string) string { return filepath.Join(dir, name) }
	return fmt.Sprintf(`worker_processes %d;
pid %s;
error_log %s warn;
events { worker_connections 4096; }
http {
	access_log off;
	client_body_temp_path %s;
	proxy_temp_path %s;
	fastcgi_temp_path %s;
	uwsgi_temp_path %s;
	scgi_temp_path %s;
	keepalive_requests 100000000;
	upstream app {
		server %s;
		keepalive 256;
		keepalive_requests 100000000;
	}
	server {
		listen %s ssl http2 backlog=4096;
		ssl_certificate %s;
		ssl_certificate_key %s;
		ssl_protocols TLSv1.2 TLSv1.3;
		ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
		ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256;
		ssl_ecdh_curve X25519:prime256v1;
		location / {
			proxy_pass http://app;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host $http_host;
			proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
			proxy_set_header X-Forwarded-Host $host;
			proxy_set_header X-Forwarded-Proto $scheme;
			proxy_set_header X-aws-proxy-auth "";
		}
	}
}
`, workers, p("nginx.pid"), p("error.log"), p("body"), p("proxy"), p("fastcgi"), p("uwsgi"), p("scgi"),
		backend, listen, chain, key)
}

// startNginx writes the config into dir and starts nginx in the
// foreground on a free loopback port; it is ready when the port accepts.
func startNginx(ctx context.Context, bin, dir, backend, chain, key string, workers int) (*benchNginx, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(nginxConfig(dir, addr, backend, chain, key, workers)), 0o600); err != nil {
		return nil, err
	}
	// -e: the error log before the config is read goes to dir too, not to
	// the system's /var/log/nginx.
	cmd := exec.Command(bin, "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", conf, "-g", "daemon off;")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the benchmark
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting nginx: %w", err)
	}
	n := &benchNginx{cmd: cmd, addr: addr, done: make(chan error, 1), dir: dir}
	go func() { n.done <- cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return n, nil
		}
		select {
		case err := <-n.done:
			n.done <- err
			return nil, fmt.Errorf("nginx exited at start (%v): %s", err, n.errorLog())
		case <-ctx.Done():
			n.stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			n.stop()
			return nil, fmt.Errorf("nginx did not listen on %s within 10s: %s: %w", addr, n.errorLog(), errdefs.ErrUnavailable)
		}
	}
}

func (n *benchNginx) errorLog() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// stop asks nginx to quit (workers finish their requests), then kills
// it if it has not gone within 5 s.
func (n *benchNginx) stop() error {
	n.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case err := <-n.done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil // a signal ended it, as asked
		}
		return err
	case <-time.After(5 * time.Second):
		n.cmd.Process.Kill()
		return <-n.done
	}
}

// freeLoopbackAddr picks a loopback port for a server that cannot be
// handed a listener (nginx): the kernel's choice, released at once.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
