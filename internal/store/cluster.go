package store

import (
	"context"
	"time"
)

// NodeState is a host's standing in the cluster.
type NodeState string

const (
	// NodeActive: the node renews its lease and may be given microVMs.
	NodeActive NodeState = "ACTIVE"
	// NodeLost: the node stopped renewing its lease for longer than the
	// grace period; its microVMs were terminated with ReasonHostLost. It
	// becomes ACTIVE again only by registering anew.
	NodeLost NodeState = "LOST"
)

// ClusterStore is a store that also keeps the cluster's records: what
// both control and node need.
type ClusterStore interface {
	Store
	Cluster
}

// ReasonHostLost is the state reason (prefix) of a microVM terminated
// because its node was declared lost.
const ReasonHostLost = "HostLost"

// Node is one host running `kiln node`. A single `kiln server` has none:
// its microVMs have Microvm.Node "".
type Node struct {
	Name string `json:"name"`
	// RPCAddr is host:port of the node's gRPC service (mutual TLS), which
	// control calls to start, suspend, resume and terminate microVMs.
	RPCAddr string `json:"rpcAddr"`
	// TunnelAddr is host:port of the node's endpoint tunnel (mutual TLS),
	// through which edges reach the microVMs it runs.
	TunnelAddr string `json:"tunnelAddr"`
	// Platform is the node's snapshot platform key (vmm.Platform): a
	// microVM is placed only on a node whose key equals its template's.
	Platform string `json:"platform"`
	// CapacityMiB is the guest memory the node may commit.
	CapacityMiB int64     `json:"capacityMiB"`
	State       NodeState `json:"state"`
	// Cordoned nodes keep what they run but are given nothing new.
	Cordoned       bool      `json:"cordoned,omitempty"`
	LeaseExpiresAt time.Time `json:"leaseExpiresAt"`
	RegisteredAt   time.Time `json:"registeredAt"`
	UpdatedAt      time.Time `json:"updatedAt"`
	// CommittedMiB is computed when read: the memory of the microVMs
	// placed on the node that are not TERMINATED.
	CommittedMiB int64 `json:"committedMiB"`
}

// Placement is what PlaceMicrovm needs to choose a node.
type Placement struct {
	MemoryMiB int64
	// Platform, when set, must equal the node's.
	Platform string
	// Template ("ACCOUNT/IMAGE/VERSION"): nodes that hold it are preferred.
	Template string
	Now      time.Time
}

// Cluster is the part of the store that many hosts share: nodes, their
// leases, placement and singleton leases. The SQL stores implement it
// (SQLite for one machine and tests, PostgreSQL for a cluster).
type Cluster interface {
	// RegisterNode creates or updates the node named n.Name: addresses,
	// platform, capacity and lease (n.LeaseExpiresAt). It becomes ACTIVE,
	// also when it was LOST (its old microVMs stay TERMINATED). A known
	// node keeps its Cordoned; a new one is written as given.
	// RegisteredAt and UpdatedAt default to now. Returns the record as
	// written, with CommittedMiB. errdefs.ErrInvalid without a name or
	// with a negative capacity.
	RegisterNode(ctx context.Context, n Node) (Node, error)
	// RenewNodeLease moves an ACTIVE node's lease to until.
	// errdefs.ErrNotFound if unknown; errdefs.ErrConflict if LOST (the
	// node must register again and reconcile).
	RenewNodeLease(ctx context.Context, name string, until time.Time) error
	GetNode(ctx context.Context, name string) (Node, error)
	// ListNodes returns every node, by name.
	ListNodes(ctx context.Context) ([]Node, error)
	// SetNodeCordoned marks a node (un)cordoned. ErrNotFound if unknown.
	SetNodeCordoned(ctx context.Context, name string, cordoned bool) error
	// SetNodeTemplates replaces the set of templates a node holds locally
	// (keys "ACCOUNT/IMAGE/VERSION"), which placement prefers.
	SetNodeTemplates(ctx context.Context, name string, templates []string) error
	// PlaceMicrovm chooses a node for the microVM and records it in one
	// transaction: Microvm.Node set, Microvm.Epoch incremented and
	// UpdatedAt p.Now (zero: now); the state is not changed, so no event
	// is recorded. A node's CommittedMiB adds up the Microvm.MemoryMiB
	// recorded, so callers create microVMs with their size set; a
	// placement asking for more (p.MemoryMiB) records the larger size. A
	// microVM placed again is not counted against its own placement. Only
	// nodes that are ACTIVE, not cordoned, with an unexpired lease at
	// p.Now, of p.Platform and with CapacityMiB-CommittedMiB >= that size
	// qualify; among them nodes holding p.Template come first, then the
	// most free memory, then the name. Concurrent placements never
	// over-commit a node (PostgreSQL: placements take turns on an advisory
	// lock). errdefs.ErrExhausted (saying why) if none fits;
	// errdefs.ErrConflict if the microVM is TERMINATED or TERMINATING;
	// errdefs.ErrNotFound if there is no such microVM.
	PlaceMicrovm(ctx context.Context, account, id string, p Placement) (Microvm, Node, error)
	// ExpireNodes declares LOST every ACTIVE node whose lease expired
	// before now-grace and, in the same transaction, moves its microVMs
	// that are not TERMINATED to TERMINATED (TerminatedAt now) with reason
	// "HostLost: node NAME stopped renewing its lease at T", recording the
	// events as any state change does, and to the next placement epoch,
	// so that a late report of the lost node is refused (AtEpoch).
	// Returns the names declared lost, by name; concurrent calls declare
	// each node once.
	//
	// A store outage stops every node's renewals: callers run it only
	// once the store has answered them for at least grace, so that nodes
	// had the time to renew and a node is lost only when it alone
	// stopped.
	ExpireNodes(ctx context.Context, now time.Time, grace time.Duration) ([]string, error)
	// ListNodeMicrovms returns the microVMs placed on node that are not
	// TERMINATED (what the node must reconcile against).
	ListNodeMicrovms(ctx context.Context, node string) ([]Microvm, error)
	// LocateMicrovm returns a microVM by id alone, whatever its account
	// (an edge routes by the endpoint's host name). ErrNotFound if absent.
	LocateMicrovm(ctx context.Context, id string) (Microvm, error)
	// AcquireLease takes or renews the named singleton lease for holder
	// until until, if it is free, expired at now, or already holder's;
	// false if another holder has it.
	AcquireLease(ctx context.Context, name, holder string, until, now time.Time) (bool, error)
	// ReleaseLease gives the lease up if holder has it; otherwise it does
	// nothing.
	ReleaseLease(ctx context.Context, name, holder string) error
}
