//go:build linux

package soakbench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// EndpointClient reaches endpoints https://ID.DOMAIN[:PORT] at addr, a
// server's endpoint proxy or an edge (those names do not resolve through
// the C library), trusting the CA in caFile. It keeps up to keepAlive
// connections open; 0 makes a fresh connection per request.
func EndpointClient(caFile, addr string, keepAlive int) (*http.Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no certificate in " + caFile)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		DisableKeepAlives:   keepAlive == 0,
		MaxIdleConnsPerHost: keepAlive,
		IdleConnTimeout:     time.Minute,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
	}}, nil
}

// Terminate ends a microVM and waits (bounded) until it is TERMINATED, so
// the next run does not share the host with it.
func Terminate(ctx context.Context, c *awscli.Client, id string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	awscli.Call(ctx, c, awscli.Find("TerminateMicrovm"), map[string]any{"microvmIdentifier": id})
	for ctx.Err() == nil {
		out, err := awscli.Call(ctx, c, awscli.Find("GetMicrovm"), map[string]any{"microvmIdentifier": id})
		if err != nil || out["state"] == "TERMINATED" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
