package sqlite

// migrationCluster holds the cluster (internal/store/sqlstore/cluster.go):
// nodes, the templates they hold, singleton leases, and the node each
// microVM is placed on, as a column (from its record) that placement sums
// memory by and a node's reconciliation lists by.
const migrationCluster = `CREATE TABLE IF NOT EXISTS nodes (
		name TEXT PRIMARY KEY,
		state TEXT NOT NULL,
		cordoned INTEGER NOT NULL DEFAULT 0,
		lease_expires_at INTEGER NOT NULL,
		data TEXT NOT NULL
	);
	CREATE TABLE IF NOT EXISTS node_templates (
		node TEXT NOT NULL,
		template TEXT NOT NULL,
		PRIMARY KEY (node, template)
	);
	CREATE INDEX IF NOT EXISTS node_templates_by_template ON node_templates (template);
	CREATE TABLE IF NOT EXISTS leases (
		name TEXT PRIMARY KEY,
		holder TEXT NOT NULL,
		expires_at INTEGER NOT NULL
	);
	ALTER TABLE microvms ADD COLUMN node TEXT NOT NULL DEFAULT '';
	UPDATE microvms SET node = COALESCE(json_extract(data, '$.node'), '') WHERE data LIKE '%"node":%';
	CREATE INDEX IF NOT EXISTS microvms_by_node ON microvms (node, state);`
