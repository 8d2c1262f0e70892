// Package endpoint starts the HTTPS endpoint side of a kiln server: the
// certificates for https://ID.DOMAIN (kiln's own CA, exported to
// DATA_DIR/ca.pem, or the operator's), the signer of endpoint tokens and
// the endpoint proxy on its listener. `kiln server` (internal/server)
// and `kiln edge` start it the same way; it does not import the engine:
// the edge runs no VMs.
package endpoint

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/tlsca"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// Config says where and how the endpoints serve.
type Config struct {
	// Addr is the listener's address (port 0: any).
	Addr string
	// DataDir holds tls/ (the CA and leaf) and ca.pem.
	DataDir string
	// CertFile and KeyFile are the operator's certificate (--endpoint-cert,
	// --endpoint-key); "": kiln's own CA.
	CertFile, KeyFile string
	// Key signs and checks endpoint tokens.
	Key []byte
	// Proxy is the proxy's configuration but for Domain and Tokens,
	// which Start fills in.
	Proxy proxy.Config
	// Domain: endpoints are https://ID.Domain.
	Domain string
	// Grace is how long open requests may finish once ctx ends (default 5 s).
	Grace time.Duration
}

// Endpoints are serving endpoints.
type Endpoints struct {
	// Addr is the listener's address; CAFile the CA clients trust
	// (DATA_DIR/ca.pem, unless the operator's certificate serves).
	Addr, CAFile string
	// Signer mints the tokens the proxy checks.
	Signer *token.Signer

	done chan struct{}
	err  error
}

// Wait waits until the proxy stopped (after ctx ended, or failing) and
// returns why it failed.
func (e *Endpoints) Wait() error {
	<-e.done
	return e.err
}

// Start serves the endpoints until ctx ends.
func Start(ctx context.Context, c Config) (*Endpoints, error) {
	caFile := filepath.Join(c.DataDir, "ca.pem")
	certs, err := tlsca.Open(tlsca.Config{Domain: c.Domain, Dir: filepath.Join(c.DataDir, "tls"), CAExport: caFile,
		CertFile: c.CertFile, KeyFile: c.KeyFile})
	if err != nil {
		return nil, fmt.Errorf("endpoint certificate: %w", err)
	}
	signer, err := token.NewSigner(c.Key)
	if err != nil {
		return nil, err
	}
	pc := c.Proxy
	pc.Domain, pc.Tokens = c.Domain, signer
	px, err := proxy.New(pc)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", c.Addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", c.Addr, err)
	}
	grace := c.Grace
	if grace <= 0 {
		grace = 5 * time.Second
	}
	e := &Endpoints{Addr: ln.Addr().String(), CAFile: caFile, Signer: signer, done: make(chan struct{})}
	go certs.Run(ctx)
	go func() {
		defer close(e.done)
		e.err = px.Serve(ctx, ln, certs.TLSConfig(), grace)
	}()
	return e, nil
}
