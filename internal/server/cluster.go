package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"time"

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

// Identity loads the role's cluster certificate and checks its role.
func (c ClusterOptions) Identity(role clusterca.Role) (*clusterca.Identity, error) {
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

// ClusterStore is the store as the roles need it.
func ClusterStore(st store.Store) (store.ClusterStore, error) {
	cs, ok := st.(store.ClusterStore)
	if !ok {
		return nil, fmt.Errorf("this state store cannot hold a cluster: use --store postgres://... (or sqlite for one machine)")
	}
	return cs, nil
}

// controlBackend is the factory of `kiln control`: the cluster backend
// over the nodes, and endpoint tokens signed with --token-key (default
// DATA_DIR/token.key), which the edges must share to check them.
func controlBackend(ctx context.Context, o Options, st store.Store, _ *lifecycle.Reporter) (backend, error) {
	cs, err := ClusterStore(st)
	if err != nil {
		return backend{}, err
	}
	id, err := o.Cluster.Identity(clusterca.Control)
	if err != nil {
		return backend{}, err
	}
	key, err := LoadTokenKey(o)
	if err != nil {
		return backend{}, err
	}
	signer, err := token.NewSigner(key)
	if err != nil {
		return backend{}, err
	}
	clients := noderpc.NewClients(id.ClientTLS(clusterca.Node))
	go func() { <-ctx.Done(); clients.Close() }()
	return backend{Backend: control.New(cs, clients, o.logger()), Tokens: &engine.TokenIssuer{Signer: signer}, Signer: signer}, nil
}

// startControlLoops runs what one replica at a time must: the life
// cycle's timers and the node reaper, each under its lease.
func startControlLoops(ctx context.Context, o Options, st store.Store, srv *api.Server, be lifecycle.Backend) error {
	cs, err := ClusterStore(st)
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
