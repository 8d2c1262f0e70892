//go:build linux

package server

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/cluster/node"
	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/cluster/tunnel"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/proxy"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

func init() { runNode = runEngineNode }

// runEngineNode is `kiln node`: this host's engine, registered in the
// cluster store and served to control over gRPC.
func runEngineNode(ctx context.Context, o Options, st store.Store) error {
	cs, err := ClusterStore(st)
	if err != nil {
		return err
	}
	c := o.Cluster
	id, err := c.Identity(clusterca.Node)
	if err != nil {
		return err
	}
	if id.Name != c.NodeName {
		return fmt.Errorf("--cluster-cert was issued to node %q, but --node-name is %q", id.Name, c.NodeName)
	}
	if c.GRPCAddr == "" {
		return fmt.Errorf("kiln node needs --grpc-addr HOST:PORT, the address control reaches it at")
	}
	ln, err := net.Listen("tcp", c.GRPCAddr)
	if err != nil {
		return fmt.Errorf("--grpc-addr %s: %w", c.GRPCAddr, err)
	}
	defer ln.Close()
	if c.TunnelAddr == "" {
		host, port, _ := net.SplitHostPort(ln.Addr().String())
		p, _ := strconv.Atoi(port)
		c.TunnelAddr = net.JoinHostPort(host, strconv.Itoa(p+1))
	}
	log := o.logger().With("node", c.NodeName)
	cordon, err := c.cordonWatcher(cs, log)
	if err != nil {
		return err
	}
	rep := lifecycle.NewReporter(st)
	peers := noderpc.NewClients(id.ClientTLS(clusterca.Node))
	defer peers.Close()
	eng, drv, err := startEngine(ctx, o, st, rep, c.NodeName, node.TemplateFetcher(cs, c.NodeName, peers, log), log)
	if err != nil {
		return err
	}
	// The node's own life cycle: idle suspends and wakes of its microVMs
	// go through it, with the engine as its backend. Its timers and
	// recovery are control's, so it is never started.
	lifecycle.New(st, eng, nil)
	var platform []byte
	if p, ok := drv.(interface{ Platform() vmm.Platform }); ok {
		platform, _ = json.Marshal(p.Platform())
	}
	_, allowed := eng.CommittedMiB()
	if c.CapacityMiB > 0 {
		allowed = c.CapacityMiB
	} else if allowed <= 0 {
		allowed = 1 << 40 // --memory-overcommit 0: no bound on this host
	}
	rpcAddr := c.GRPCAddr
	if _, port, _ := net.SplitHostPort(rpcAddr); port == "0" {
		rpcAddr = ln.Addr().String()
	}
	n, err := node.New(node.Config{Store: cs, Engine: eng, Name: c.NodeName, RPCAddr: rpcAddr, TunnelAddr: c.TunnelAddr,
		Platform: string(platform), CapacityMiB: allowed, LeaseTTL: c.NodeLease, Log: log})
	if err != nil {
		return err
	}
	srv := noderpc.NewServer(id, n.Service())
	// The endpoint tunnel: only edges may open one (it reaches any guest
	// port without an endpoint token; the edge checked the token).
	tln, err := net.Listen("tcp", c.TunnelAddr)
	if err != nil {
		return fmt.Errorf("--tunnel-addr %s: %w", c.TunnelAddr, err)
	}
	// The shell's port and envd's are served here, by the same handlers as
	// `kiln server`'s, behind the edge's token checks. The edge keeps a
	// tunnel open between requests: each request wakes a microVM suspended
	// since (auto-resume), as `kiln server`'s proxy does.
	hostPorts := map[uint16]http.Handler{proxy.ShellPort: proxy.WakeFirst(eng, false, log, eng.ShellHandler())}
	if es, ok := st.(store.E2BStore); ok {
		hostPorts[e2b.EnvdPort] = proxy.WakeFirst(eng, true, log, newEnvdHandler(st, es, eng))
	}
	tun, err := tunnel.NewServer(tunnel.ServerConfig{TLS: id.ServerTLS(clusterca.Edge), Resolver: eng,
		Dial: netns.HostDialer(5 * time.Second).DialContext, HostPorts: hostPorts, Logger: log})
	if err != nil {
		return err
	}
	go tun.Serve(ctx, tln)
	go n.Run(ctx)
	if cordon != nil {
		go cordon.Run(ctx)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	slog.Info("kiln node serving", "name", c.NodeName, "grpc", ln.Addr().String(), "capacity_mib", allowed, "accel", eng.Accel())
	fmt.Printf("kiln node %s serving control at %s\n", c.NodeName, ln.Addr())
	select {
	case err := <-errc:
		return fmt.Errorf("serving the node service: %w", err)
	case <-ctx.Done():
	}
	srv.GracefulStop()
	return nil
}
