package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/cluster/control"
	"github.com/kiln-sandbox/kiln/internal/cluster/kube"
	"github.com/kiln-sandbox/kiln/internal/cluster/noderpc"
	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/token"
)

// ClusterOptions are the flags of the cluster roles (docs/CLUSTER.md).
type ClusterOptions struct {
	// CA, Cert and Key are the role's identity (clusterca): PEM files.
	CA, Cert, Key string
	// NodeName, GRPCAddr and TunnelAddr: `kiln node`'s name and the
	// addresses control and edges reach it at (registered in the store).
	NodeName, GRPCAddr, TunnelAddr string
	// CapacityMiB is the guest memory a node offers placement (0: what
	// --memory-overcommit allows this host).
	CapacityMiB int64
	// KubeNode is the Kubernetes Node whose cordon (spec.unschedulable)
	// `kiln node` mirrors into the store ("": --node-name when running
	// in a Pod, none otherwise).
	KubeNode string
	// NodeLease is how long a node's lease lasts per renewal; NodeGrace
	// how long after it runs out control declares the node lost.
	NodeLease, NodeGrace time.Duration
}

func addClusterFlags(f *pflag.FlagSet, c *ClusterOptions, node bool) {
	f.StringVar(&c.CA, "cluster-ca", "", "PEM file of the cluster CA certificate (`kiln cluster-ca init`)")
	f.StringVar(&c.Cert, "cluster-cert", "", "PEM file of this role's cluster certificate (`kiln cluster-ca issue`)")
	f.StringVar(&c.Key, "cluster-key", "", "PEM file of the key of --cluster-cert")
	f.DurationVar(&c.NodeLease, "node-lease", 10*time.Second, "how long one renewal of a node's lease lasts")
	if node {
		host, _ := os.Hostname()
		f.StringVar(&c.NodeName, "node-name", host, "this node's name in the cluster (its certificate's name)")
		f.StringVar(&c.GRPCAddr, "grpc-addr", "", "HOST:PORT of this node's service for control and edges (mutual TLS); HOST must be in its certificate")
		f.Int64Var(&c.CapacityMiB, "capacity-mib", 0, "guest memory MiB this node offers to placement (default: what --memory-overcommit allows this host)")
		f.StringVar(&c.KubeNode, "kube-node", "", "Kubernetes Node whose cordon (kubectl cordon/drain) stops placement here (default: --node-name when running in a Kubernetes Pod; \"-\": none)")
		f.StringVar(&c.TunnelAddr, "tunnel-addr", "", "HOST:PORT of this node's endpoint tunnel for edges (mutual TLS; default: the --grpc-addr host, port+1)")
	} else {
		f.DurationVar(&c.NodeGrace, "node-grace", 20*time.Second, "how long after a node's lease runs out it is declared lost and its microVMs terminated (HostLost)")
	}
}

// identity loads the role's cluster certificate and checks its role.
func (c ClusterOptions) identity(role clusterca.Role) (*clusterca.Identity, error) {
	if c.CA == "" || c.Cert == "" || c.Key == "" {
		return nil, fmt.Errorf("kiln %s needs --cluster-ca, --cluster-cert and --cluster-key (make them with `kiln cluster-ca init` and `kiln cluster-ca issue --role %s`)", role, role)
	}
	id, err := clusterca.Load(c.CA, c.Cert, c.Key)
	if err != nil {
		return nil, err
	}
	if id.Role != role {
		return nil, fmt.Errorf("--cluster-cert was issued for the %s role, not %s", id.Role, role)
	}
	return id, nil
}

// clusterStore is the store as the roles need it.
func clusterStore(st store.Store) (store.ClusterStore, error) {
	cs, ok := st.(store.ClusterStore)
	if !ok {
		return nil, fmt.Errorf("this state store cannot hold a cluster: use --store postgres://... (or sqlite for one machine)")
	}
	return cs, nil
}

func init() {
	var sf serverFlags
	ctl := &cobra.Command{
		Use:   "control",
		Short: "Serve the API and the life cycle of a cluster, placing microVMs on `kiln node` hosts",
		Long: `Serve the AWS-compatible API, the E2B API and the console, and run the
life cycle for a cluster: each RunMicrovm is placed on a node that has room
(store transaction) and handed to it over gRPC with mutual TLS. Several
replicas share one PostgreSQL store (--store or KILN_STORE); the timers
(maximum duration, suspended retention) and the declaring of lost nodes
run on one replica at a time, under leases in the store.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return sf.run(cmd, "control") },
	}
	sf.add(ctl.Flags())
	addClusterFlags(ctl.Flags(), &sf.o.Cluster, false)
	ctl.Flags().StringVar(&sf.o.TokenKey, "token-key", "", "file of the key endpoint tokens are signed with, which every control replica and edge shares (default DATA_DIR/token.key, made on first use)")
	rootCmd.AddCommand(ctl)

	var nf serverFlags
	nd := &cobra.Command{
		Use:   "node",
		Short: "Run this host's microVMs for a cluster's control",
		Long: `Run the VM engine of this host for a kiln cluster: register with the
store (capacity, platform, addresses), renew a lease, recover and reconcile
the microVMs placed here, and serve control's calls over gRPC with mutual
TLS. A node that cannot reach the store keeps its microVMs running and
takes no new work until it can.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return nf.run(cmd, "node") },
	}
	nf.add(nd.Flags())
	addClusterFlags(nd.Flags(), &nf.o.Cluster, true)
	rootCmd.AddCommand(nd)

	ca := &cobra.Command{Use: "cluster-ca", Short: "Make the cluster CA and the certificates of control, nodes and edges"}
	var caDir string
	ca.PersistentFlags().StringVar(&caDir, "dir", "", "directory of the cluster CA (ca.crt, ca.key); keep ca.key with the operator")
	ca.AddCommand(&cobra.Command{Use: "init", Short: "Create the cluster CA in --dir (kept if it exists)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" {
				return fmt.Errorf("--dir is required")
			}
			if _, err := clusterca.Init(caDir); err != nil {
				return err
			}
			fmt.Println(filepath.Join(caDir, clusterca.CACert))
			return nil
		}})
	var role, name, out string
	var hosts []string
	issue := &cobra.Command{Use: "issue", Short: "Issue a role's certificate into --out (ca.crt, tls.crt, tls.key)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" || out == "" {
				return fmt.Errorf("--dir and --out are required")
			}
			c, err := clusterca.Init(caDir)
			if err != nil {
				return err
			}
			return c.Issue(out, clusterca.Role(role), name, hosts)
		}}
	issue.Flags().StringVar(&role, "role", "", "control, node or edge")
	issue.Flags().StringVar(&name, "name", "", "the holder's name (a node's --node-name)")
	issue.Flags().StringArrayVar(&hosts, "host", nil, "host name or address the holder serves on (a node's --grpc-addr host); repeatable")
	issue.Flags().StringVar(&out, "out", "", "directory to write the certificate and key into")
	ca.AddCommand(issue)
	rootCmd.AddCommand(ca)
}

// runNode runs `kiln node` (set where the VM engine is linked in).
var runNode func(ctx context.Context, o ServerOptions, st store.Store) error

// controlBackend is the factory of `kiln control`: the cluster backend
// over the nodes, and endpoint tokens signed with --token-key (default
// DATA_DIR/token.key), which the edges must share to check them.
func controlBackend(ctx context.Context, o ServerOptions, st store.Store, _ *lifecycle.Reporter) (lifecycle.Backend, api.TokenIssuer, error) {
	cs, err := clusterStore(st)
	if err != nil {
		return nil, nil, err
	}
	id, err := o.Cluster.identity(clusterca.Control)
	if err != nil {
		return nil, nil, err
	}
	key, err := loadTokenKey(o)
	if err != nil {
		return nil, nil, err
	}
	signer, err := token.NewSigner(key)
	if err != nil {
		return nil, nil, err
	}
	clients := noderpc.NewClients(id.ClientTLS(clusterca.Node))
	go func() { <-ctx.Done(); clients.Close() }()
	return control.New(cs, clients, newLogger()), &engine.TokenIssuer{Signer: signer}, nil
}

// startControlLoops runs what one replica at a time must: the life
// cycle's timers and the node reaper, each under its lease.
func startControlLoops(ctx context.Context, o ServerOptions, st store.Store, srv *api.Server, be lifecycle.Backend) error {
	cs, err := clusterStore(st)
	if err != nil {
		return err
	}
	holder := replicaName()
	ttl := max(o.Cluster.NodeLease, 5*time.Second)
	timers := &control.Singleton{St: cs, Name: control.LeaseTimers, Holder: holder, TTL: ttl}
	srv.Lifecycle().SetGate(timers.Held)
	cb, _ := be.(*control.Backend)
	reaper := &control.NodeReaper{St: cs, Backend: cb, NodeLease: o.Cluster.NodeLease, Grace: o.Cluster.NodeGrace, Every: time.Second,
		Lease: &control.Singleton{St: cs, Name: control.LeaseNodes, Holder: holder, TTL: ttl}}
	go reaper.Run(ctx)
	go func() { <-ctx.Done(); timers.Release(context.WithoutCancel(ctx)) }()
	slog.Info("control replica", "holder", holder, "node_lease", o.Cluster.NodeLease, "node_grace", o.Cluster.NodeGrace)
	return nil
}

// replicaName tells replicas apart in leases: host, pid and a random
// part (a restarted replica is a new holder).
func replicaName() string {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b))
}

// cordonWatcher is `kiln node`'s watcher of its Kubernetes Node's cordon
// (nil outside Kubernetes, or with --kube-node -). In a Pod without an
// API token it fails rather than silently ignore `kubectl cordon`.
func (c ClusterOptions) cordonWatcher(cs store.Cluster, log *slog.Logger) (*kube.CordonWatcher, error) {
	name := c.KubeNode
	switch {
	case name == "-":
		return nil, nil
	case name == "" && !kube.InCluster():
		return nil, nil
	case name == "":
		name = c.NodeName
	}
	cl, err := kube.NewInCluster(kube.ServiceAccountDir)
	if err != nil {
		return nil, fmt.Errorf("--kube-node %s: %w; --kube-node - runs without following the Node's cordon", name, err)
	}
	return &kube.CordonWatcher{Client: cl, KubeNode: name, KilnNode: c.NodeName, Store: cs, Log: log}, nil
}
