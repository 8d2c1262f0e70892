package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// The cluster (store.Cluster): nodes, the templates they hold, placement,
// HostLost and singleton leases.
//
// A node's state, cordon and lease are columns, and the columns are what
// counts: the JSON document beside them keeps what registration wrote, so
// that a lease renewal (every few seconds from every node) is one UPDATE
// of one column rather than a rewrite of the record.

var _ store.Cluster = (*Store)(nil)

// lockCluster makes placements and node expiries take turns where the
// database does not already run one writer at a time.
func (s *Store) lockCluster(ctx context.Context, tx Querier) error {
	if s.d.LockCluster == "" {
		return nil
	}
	if _, err := tx.Exec(ctx, s.d.LockCluster); err != nil {
		return fmt.Errorf("locking placement: %w", err)
	}
	return nil
}

// readNodes reads the nodes that where (a condition on n, "" for all)
// selects, by name, each with the memory its live microVMs commit, the
// microVM except aside (one being placed again moves with its memory).
func (s *Store) readNodes(ctx context.Context, q Querier, except, where string, args ...any) ([]store.Node, error) {
	rows, err := q.Query(ctx, `SELECT n.state, n.cordoned, n.lease_expires_at, n.data,
			(SELECT CAST(COALESCE(SUM(m.memory_mib), 0) AS BIGINT) FROM microvms m
			 WHERE m.node = n.name AND m.state != 'TERMINATED' AND m.id != ?)
		FROM nodes n`+where+` ORDER BY n.name`+s.d.Collate, append([]any{except}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	defer rows.Close()
	var out []store.Node
	for rows.Next() {
		var state, data string
		var cordoned bool
		var lease, committed int64
		if err := rows.Scan(&state, &cordoned, &lease, &data, &committed); err != nil {
			return nil, fmt.Errorf("scanning node: %w", err)
		}
		n, err := decode[store.Node](data, "node")
		if err != nil {
			return nil, err
		}
		n.State, n.Cordoned = store.NodeState(state), cordoned
		n.LeaseExpiresAt = time.Unix(0, lease).UTC()
		n.CommittedMiB = committed
		out = append(out, n)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	return out, nil
}

// readNode is readNodes of one node; ErrNotFound if it is not registered.
func (s *Store) readNode(ctx context.Context, q Querier, name string) (store.Node, error) {
	ns, err := s.readNodes(ctx, q, "", ` WHERE n.name = ?`, name)
	if absent(err) || err == nil && len(ns) == 0 {
		return store.Node{}, unknownNode(name)
	}
	if err != nil {
		return store.Node{}, err
	}
	return ns[0], nil
}

func unknownNode(name string) error {
	return fmt.Errorf("node %q is not registered (a node registers when `kiln node` starts): %w", name, errdefs.ErrNotFound)
}

func (s *Store) RegisterNode(ctx context.Context, n store.Node) (store.Node, error) {
	if n.Name == "" || n.CapacityMiB < 0 {
		return n, fmt.Errorf("registering node %q with capacity %d MiB: a node needs a name and a capacity of 0 or more: %w",
			n.Name, n.CapacityMiB, errdefs.ErrInvalid)
	}
	now := time.Now().UTC()
	if n.RegisteredAt.IsZero() {
		n.RegisteredAt = now
	}
	if n.UpdatedAt.IsZero() {
		n.UpdatedAt = n.RegisteredAt
	}
	n.State, n.CommittedMiB = store.NodeActive, 0
	in := n
	err := s.db.Write(ctx, func(tx Querier) error {
		n = in
		// A new node is inserted as given; a known one keeps its cordon.
		made, err := tx.Exec(ctx, `INSERT INTO nodes (name, state, cordoned, lease_expires_at, data) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING`,
			n.Name, string(n.State), n.Cordoned, n.LeaseExpiresAt.UnixNano(), mustJSON(n))
		if err != nil {
			return fmt.Errorf("registering node %s: %w", n.Name, err)
		}
		if made == 0 {
			if err := tx.QueryRow(ctx, `SELECT cordoned FROM nodes WHERE name = ?`+s.d.ForUpdate, n.Name).Scan(&n.Cordoned); err != nil {
				return fmt.Errorf("reading node %s: %w", n.Name, err)
			}
			if _, err := tx.Exec(ctx, `UPDATE nodes SET state = ?, lease_expires_at = ?, data = ? WHERE name = ?`,
				string(n.State), n.LeaseExpiresAt.UnixNano(), mustJSON(n), n.Name); err != nil {
				return fmt.Errorf("registering node %s: %w", n.Name, err)
			}
		}
		n, err = s.readNode(ctx, tx, n.Name)
		return err
	})
	return n, err
}

func (s *Store) RenewNodeLease(ctx context.Context, name string, until time.Time) error {
	n, err := s.db.Writer().Exec(ctx, `UPDATE nodes SET lease_expires_at = ? WHERE name = ? AND state = ?`,
		until.UnixNano(), name, string(store.NodeActive))
	if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("renewing the lease of node %s: %w", name, err)
	}
	if err == nil && n > 0 {
		return nil
	}
	var state string
	if err := s.r.QueryRow(ctx, `SELECT state FROM nodes WHERE name = ?`, name).Scan(&state); absent(err) {
		return unknownNode(name)
	} else if err != nil {
		return fmt.Errorf("reading node %s: %w", name, err)
	}
	return fmt.Errorf("node %s is %s (its lease expired and its microVMs were terminated): register it again and reconcile: %w",
		name, state, errdefs.ErrConflict)
}

func (s *Store) GetNode(ctx context.Context, name string) (store.Node, error) {
	return s.readNode(ctx, s.r, name)
}

func (s *Store) ListNodes(ctx context.Context) ([]store.Node, error) {
	return s.readNodes(ctx, s.r, "", "")
}

func (s *Store) SetNodeCordoned(ctx context.Context, name string, cordoned bool) error {
	n, err := s.db.Writer().Exec(ctx, `UPDATE nodes SET cordoned = ? WHERE name = ?`, cordoned, name)
	if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("cordoning node %s: %w", name, err)
	}
	if err != nil || n == 0 {
		return unknownNode(name)
	}
	return nil
}

func (s *Store) SetNodeTemplates(ctx context.Context, name string, templates []string) error {
	return s.db.Write(ctx, func(tx Querier) error {
		// The node's row lock makes two replacements of its set take turns.
		var got string
		err := tx.QueryRow(ctx, `SELECT name FROM nodes WHERE name = ?`+s.d.ForUpdate, name).Scan(&got)
		if absent(err) {
			return unknownNode(name)
		}
		if err != nil {
			return fmt.Errorf("reading node %s: %w", name, err)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM node_templates WHERE node = ?`, name); err != nil {
			return fmt.Errorf("replacing the templates of node %s: %w", name, err)
		}
		for _, t := range templates {
			if _, err := tx.Exec(ctx, `INSERT INTO node_templates (node, template) VALUES (?, ?) ON CONFLICT (node, template) DO NOTHING`, name, t); err != nil {
				return fmt.Errorf("recording template %q of node %s: %w", t, name, err)
			}
		}
		return nil
	})
}

// nodesHolding returns the names of the nodes that hold template.
func nodesHolding(ctx context.Context, q Querier, template string) (map[string]bool, error) {
	out := map[string]bool{}
	if template == "" {
		return out, nil
	}
	rows, err := q.Query(ctx, `SELECT node FROM node_templates WHERE template = ?`, template)
	if err != nil {
		return nil, fmt.Errorf("listing the nodes that hold %s: %w", template, err)
	}
	defer rows.Close()
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, fmt.Errorf("listing the nodes that hold %s: %w", template, err)
		}
		out[n] = true
	}
	return out, rows.Err()
}

func (s *Store) PlaceMicrovm(ctx context.Context, account, id string, p store.Placement) (store.Microvm, store.Node, error) {
	if p.Now.IsZero() {
		p.Now = time.Now()
	}
	var m store.Microvm
	var n store.Node
	err := s.db.Write(ctx, func(tx Querier) error {
		if err := s.lockCluster(ctx, tx); err != nil {
			return err
		}
		var err error
		m, err = getDoc[store.Microvm](ctx, tx, false, "microvm "+id, `SELECT data FROM microvms WHERE id = ? AND account = ?`+s.d.ForUpdate, id, account)
		if err != nil {
			return err
		}
		if m.State == store.StateTerminated || m.State == store.StateTerminating {
			return fmt.Errorf("microvm %s is %s: only a live microVM is placed: %w", id, m.State, errdefs.ErrConflict)
		}
		// What the node commits to is what the record says, so a
		// placement asking for more records the larger size.
		m.MemoryMiB = max(m.MemoryMiB, p.MemoryMiB)
		nodes, err := s.readNodes(ctx, tx, id, "")
		if err != nil {
			return err
		}
		held, err := nodesHolding(ctx, tx, p.Template)
		if err != nil {
			return err
		}
		n, err = choose(nodes, held, m.MemoryMiB, p)
		if err != nil {
			return fmt.Errorf("placing microvm %s: %w", id, err)
		}
		n.CommittedMiB += m.MemoryMiB
		m.Node, m.UpdatedAt = n.Name, p.Now.UTC()
		m.Epoch++
		return s.writeMicrovm(ctx, tx, m, m.State)
	})
	if err != nil {
		return store.Microvm{}, store.Node{}, err
	}
	return m, n, nil
}

// choose returns the node PlaceMicrovm gives a microVM of need MiB among
// nodes (by name, with their committed memory): of those that may take
// it (ACTIVE, not cordoned, leased at p.Now, of p.Platform, with room),
// one that holds the template (held) if any, then the one with the most
// free memory, then the first by name. errdefs.ErrExhausted, counting
// why each node was passed over, if none may.
func choose(nodes []store.Node, held map[string]bool, need int64, p store.Placement) (store.Node, error) {
	best := -1
	var lost, cordoned, expired, platform, full int
	mostFree, mostFreeOn := int64(-1), ""
	for i, n := range nodes {
		free := n.CapacityMiB - n.CommittedMiB
		switch {
		case n.State != store.NodeActive:
			lost++
		case n.Cordoned:
			cordoned++
		case !n.LeaseExpiresAt.After(p.Now):
			expired++
		case p.Platform != "" && n.Platform != p.Platform:
			platform++
		case free < need:
			full++
			if free > mostFree {
				mostFree, mostFreeOn = free, n.Name
			}
		case best < 0 || better(n, nodes[best], held):
			best = i
		}
	}
	if best >= 0 {
		return nodes[best], nil
	}
	if len(nodes) == 0 {
		return store.Node{}, fmt.Errorf("no node is registered: start `kiln node` on a host: %w", errdefs.ErrExhausted)
	}
	var why []string
	for _, c := range []struct {
		n    int
		what string
	}{{lost, "LOST"}, {cordoned, "cordoned"}, {expired, "with an expired lease"}, {platform, "of another platform than " + p.Platform}} {
		if c.n > 0 {
			why = append(why, fmt.Sprintf("%d %s", c.n, c.what))
		}
	}
	if full > 0 {
		why = append(why, fmt.Sprintf("%d without %d MiB free (most: %d MiB on %s)", full, need, mostFree, mostFreeOn))
	}
	return store.Node{}, fmt.Errorf("no node can take %d MiB now: of %d nodes, %s; add nodes or capacity, uncordon a node, or terminate microVMs: %w",
		need, len(nodes), strings.Join(why, ", "), errdefs.ErrExhausted)
}

// better reports whether a is a better choice than b, which comes before
// it by name.
func better(a, b store.Node, held map[string]bool) bool {
	if held[a.Name] != held[b.Name] {
		return held[a.Name]
	}
	return a.CapacityMiB-a.CommittedMiB > b.CapacityMiB-b.CommittedMiB
}

func (s *Store) ExpireNodes(ctx context.Context, now time.Time, grace time.Duration) ([]string, error) {
	var names []string
	err := s.db.Write(ctx, func(tx Querier) error {
		names = nil
		if err := s.lockCluster(ctx, tx); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT name, lease_expires_at FROM nodes WHERE state = ? AND lease_expires_at < ? ORDER BY name`+s.d.Collate+s.d.ForUpdate,
			string(store.NodeActive), now.Add(-grace).UnixNano())
		if err != nil {
			return fmt.Errorf("finding expired nodes: %w", err)
		}
		var leases []time.Time
		for rows.Next() {
			var name string
			var lease int64
			if err := rows.Scan(&name, &lease); err != nil {
				rows.Close()
				return fmt.Errorf("finding expired nodes: %w", err)
			}
			names, leases = append(names, name), append(leases, time.Unix(0, lease).UTC())
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("finding expired nodes: %w", err)
		}
		for i, name := range names {
			if err := s.loseNode(ctx, tx, name, leases[i], now); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return names, nil
}

// loseNode declares the node LOST and terminates its live microVMs, each
// moved to the next placement epoch so that a late report from the lost
// node is refused (store.AtEpoch).
func (s *Store) loseNode(ctx context.Context, tx Querier, name string, lease, now time.Time) error {
	if _, err := tx.Exec(ctx, `UPDATE nodes SET state = ? WHERE name = ?`, string(store.NodeLost), name); err != nil {
		return fmt.Errorf("declaring node %s lost: %w", name, err)
	}
	vms, err := docs[store.Microvm](ctx, tx, `SELECT data FROM microvms WHERE node = ? AND state != 'TERMINATED' ORDER BY seq`+s.d.ForUpdate, name)
	if err != nil {
		return fmt.Errorf("listing the microvms of node %s: %w", name, err)
	}
	// What the node metered ends at its last checkpoint: nothing runs
	// there any more, and no restart of it will close them.
	if _, err := tx.Exec(ctx, `UPDATE usage_intervals SET open = NOT `+s.d.True+` WHERE open = `+s.d.True+` AND node = ?`, name); err != nil {
		return fmt.Errorf("closing the usage intervals of node %s: %w", name, err)
	}
	reason := fmt.Sprintf("%s: node %s stopped renewing its lease at %s", store.ReasonHostLost, name, lease.Format(time.RFC3339))
	for _, m := range vms {
		before := m.State
		m.SetState(store.StateTerminated, reason, now.UTC())
		m.Epoch++
		if err := s.writeMicrovm(ctx, tx, m, before); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) ListNodeMicrovms(ctx context.Context, node string) ([]store.Microvm, error) {
	vms, err := docs[store.Microvm](ctx, s.r, `SELECT data FROM microvms WHERE node = ? AND state != 'TERMINATED' ORDER BY seq`, node)
	if err != nil && !absent(err) {
		return nil, fmt.Errorf("listing the microvms of node %s: %w", node, err)
	}
	return vms, nil
}

func (s *Store) LocateMicrovm(ctx context.Context, id string) (store.Microvm, error) {
	return getDoc[store.Microvm](ctx, s.r, true, "microvm "+id, `SELECT data FROM microvms WHERE id = ?`, id)
}

func (s *Store) AcquireLease(ctx context.Context, name, holder string, until, now time.Time) (bool, error) {
	if name == "" || holder == "" {
		return false, fmt.Errorf("lease %q for holder %q: a lease needs a name and a holder: %w", name, holder, errdefs.ErrInvalid)
	}
	// One statement, so that the check and the take are one
	// compare-and-set: a conflicting insert waits for the other and then
	// tests the row it committed.
	n, err := s.db.Writer().Exec(ctx, `INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
		ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
		WHERE leases.holder = excluded.holder OR leases.expires_at <= ?4`,
		name, holder, until.UnixNano(), now.UnixNano())
	if err != nil {
		return false, fmt.Errorf("acquiring lease %s: %w", name, err)
	}
	return n > 0, nil
}

func (s *Store) ReleaseLease(ctx context.Context, name, holder string) error {
	if _, err := s.db.Writer().Exec(ctx, `DELETE FROM leases WHERE name = ? AND holder = ?`, name, holder); err != nil && !errors.Is(err, errdefs.ErrInvalid) {
		return fmt.Errorf("releasing lease %s: %w", name, err)
	}
	return nil
}
