//go:build linux

// Package pglocal starts a private PostgreSQL cluster for benchmarks
// (`kiln bench api --store postgres`, `kiln bench cluster`) and, through
// pgtest, for tests: Debian's postgresql-15 binaries (installed by make setup),
// run as the postgres OS user (initdb refuses root), listening on a unix
// socket in a temporary directory and on no TCP port, with trust
// authentication (only root and the postgres user can reach the socket
// directory). Stop shuts it down and removes its files.
package pglocal

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// BinDir holds the server binaries of Debian's postgresql-15.
const BinDir = "/usr/lib/postgresql/15/bin"

// ErrMissing says the server binaries are not installed.
var ErrMissing = errors.New("postgresql-15 is not installed (" + BinDir + "); run make setup")

// Cluster is a running private cluster.
type Cluster struct {
	dir  string // data directory's parent, and the socket directory
	data string
	cred *syscall.Credential
	cmd  *exec.Cmd
	done chan struct{}
	n    atomic.Int64
}

// Available returns ErrMissing when the binaries are absent.
func Available() error {
	for _, b := range []string{"initdb", "postgres"} {
		if _, err := os.Stat(filepath.Join(BinDir, b)); err != nil {
			return ErrMissing
		}
	}
	return nil
}

// Start creates and starts a cluster; it is ready for connections when
// Start returns.
func Start(ctx context.Context) (*Cluster, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kiln-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	cred, err := credential()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	initdb := exec.CommandContext(ctx, filepath.Join(BinDir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
		"-E", "UTF8", "--locale=C", "--no-sync")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	c.data, c.cred = data, cred
	if err := c.startServer(ctx); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

// startServer runs the server on the cluster's data and waits until it
// takes connections.
func (c *Cluster) startServer(ctx context.Context) error {
	logf := filepath.Join(c.dir, "server.log")
	lf, err := os.OpenFile(logf, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer lf.Close()
	c.done = make(chan struct{})
	// fsync off: the cluster is thrown away after the run, and the host
	// is shared; what is tested is PostgreSQL's semantics, not its disk.
	c.cmd = exec.Command(filepath.Join(BinDir, "postgres"), "-D", c.data, "-k", c.dir, "-c", "listen_addresses=",
		"-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB")
	c.cmd.Stdout, c.cmd.Stderr = lf, lf
	// The server dies with the test binary even if Stop is never called.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred, Setpgid: true, Pdeathsig: syscall.SIGQUIT}
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("starting postgres: %w", err)
	}
	done := c.done
	go func() { c.cmd.Wait(); close(done) }()
	if err := c.waitReady(ctx, 30*time.Second); err != nil {
		log, _ := os.ReadFile(logf)
		c.stopServer()
		return fmt.Errorf("%w; server log:\n%s", err, log)
	}
	return nil
}

// stopServer shuts the server down (fast shutdown, then a kill after
// 10 s), keeping its data.
func (c *Cluster) stopServer() {
	if c.cmd != nil && c.cmd.Process != nil {
		c.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	}
}

// Outage stops the server for d, as an outage of the store would, and
// starts it again on the same data.
func (c *Cluster) Outage(ctx context.Context, d time.Duration) error {
	c.stopServer()
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
	return c.startServer(ctx)
}

// credential is the postgres user's, when running as root.
func credential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("looking up the postgres user (created by the postgresql package): %w", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (c *Cluster) waitReady(ctx context.Context, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, c.URL("postgres"))
		if err == nil {
			conn.Close(ctx)
			return nil
		}
		select {
		case <-c.done:
			return fmt.Errorf("postgres exited while starting")
		case <-ctx.Done():
			return fmt.Errorf("postgres not ready within %v: %w", d, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// URL is the connection URL of database db.
func (c *Cluster) URL(db string) string {
	return "postgres://postgres@/" + db + "?host=" + url.QueryEscape(c.dir) + "&sslmode=disable"
}

// NewDatabase creates an empty database and returns its URL.
func (c *Cluster) NewDatabase(ctx context.Context) (string, error) {
	name := "kiln_" + strconv.FormatInt(c.n.Add(1), 10)
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		return "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name+" STRATEGY FILE_COPY"); err != nil {
		return "", fmt.Errorf("creating database %s: %w", name, err)
	}
	return c.URL(name), nil
}

// Stop shuts the server down and removes the cluster's files.
func (c *Cluster) Stop() {
	c.stopServer()
	os.RemoveAll(c.dir)
}
