package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/cluster/edge"
	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/server/endpoint"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// EdgeReadyLine is what `kiln edge` prints once it serves.
const EdgeReadyLine = "kiln edge serving microvm endpoints at "

func init() {
	var o server.Options
	var tokenKey string
	cmd := &cobra.Command{
		Use:   "edge",
		Short: "Serve the microVM endpoints of a cluster (https://ID.DOMAIN), forwarding to the node that runs each",
		Long: `Terminate TLS for https://ID.DOMAIN, check the endpoint token (signed by
control with the key in --token-key, which every control and edge shares),
and forward the request through the node's endpoint tunnel (mutual TLS) to
the microVM. A suspended microVM with auto-resume is woken by its node. The
edge keeps only a route cache; run as many as you like.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.DataDir = dataDir
			if tokenKey == "" {
				tokenKey = filepath.Join(dataDir, "token.key")
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runEdge(ctx, o, tokenKey)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.EndpointAddr, "endpoint-addr", "127.0.0.1:8443", "address of the microVM endpoints (HTTPS)")
	f.StringVar(&o.Domain, "domain", "microvm.localhost", "microVM endpoints are https://ID.DOMAIN")
	f.StringVar(&o.MetricsAddr, "metrics-addr", "127.0.0.1:9091", "address of /metrics, /healthz and /readyz (empty: off)")
	f.StringVar(&tokenKey, "token-key", "", "the endpoint token key control signs with (default DATA_DIR/token.key)")
	addClusterFlags(f, &o.Cluster, false)
	rootCmd.AddCommand(cmd)
}

func runEdge(ctx context.Context, o server.Options, tokenKey string) error {
	id, err := o.Cluster.Identity(clusterca.Edge)
	if err != nil {
		return err
	}
	if err := server.SecureDataDir(o.DataDir); err != nil {
		return err
	}
	st, err := openStore(ctx, o.DataDir)
	if err != nil {
		return err
	}
	defer st.Close()
	cs, err := server.ClusterStore(st)
	if err != nil {
		return err
	}
	if _, err := os.Stat(tokenKey); err != nil {
		return fmt.Errorf("--token-key %s: the edge checks tokens with control's key; copy it from control's data dir: %w", tokenKey, err)
	}
	key, err := token.LoadOrCreateKey(tokenKey)
	if err != nil {
		return err
	}
	log := newLogger()
	clients := noderpc.NewClients(id.ClientTLS(clusterca.Node))
	defer clients.Close()
	nodes := edge.Nodes{Clients: clients}
	be, err := edge.New(edge.Config{Store: cs, TLS: id.ClientTLS(clusterca.Node), Waker: nodes, Activity: nodes, Logger: log})
	if err != nil {
		return err
	}
	go be.Run(ctx)
	// The shell's port needs no handler here: it goes through the tunnel
	// like any port, and the node serves it. envd's is checked here and
	// forwarded the same way (EndpointGate leaves its Handler nil).
	pcfg := proxy.Config{Backend: be, Logger: log}
	if es, ok := st.(store.E2BStore); ok {
		pcfg.Envd = e2b.EndpointGate(key, es)
	}
	ep, err := endpoint.Start(ctx, endpoint.Config{Addr: o.EndpointAddr, DataDir: o.DataDir, CertFile: endpointCert, KeyFile: endpointKey,
		Key: key, Domain: o.Domain, Proxy: pcfg})
	if err != nil {
		return err
	}
	if o.MetricsAddr != "" {
		health := metrics.NewHealth()
		health.Set("endpoint proxy", metrics.DialCheck(ep.Addr))
		mln, err := net.Listen("tcp", o.MetricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr %s: %w", o.MetricsAddr, err)
		}
		go metrics.Serve(ctx, mln, health)
	}
	slog.Info("kiln edge", "endpoints", ep.Addr, "domain", o.Domain, "ca", ep.CAFile)
	fmt.Printf("%s%s\n", EdgeReadyLine, ep.Addr)
	return ep.Wait()
}
