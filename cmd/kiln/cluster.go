package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-sandbox/kiln/internal/cluster/clusterca"
	"github.com/kiln-sandbox/kiln/internal/server"
)

// addClusterFlags adds the flags of the cluster roles (server.ClusterOptions).
func addClusterFlags(f *pflag.FlagSet, c *server.ClusterOptions, node bool) {
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
