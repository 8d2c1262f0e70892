package postgres

// migrationCluster is SQLite's migration 7 (internal/store/sqlite/cluster.go):
// nodes, the templates they hold, singleton leases, and the node each
// microVM is placed on, as a column taken from its record.
const migrationCluster = `CREATE TABLE IF NOT EXISTS nodes (
		name TEXT PRIMARY KEY,
		state TEXT NOT NULL,
		cordoned BOOLEAN NOT NULL DEFAULT false,
		lease_expires_at BIGINT NOT NULL,
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
		expires_at BIGINT NOT NULL
	);
	ALTER TABLE microvms ADD COLUMN IF NOT EXISTS node TEXT NOT NULL DEFAULT '';
	UPDATE microvms SET node = COALESCE(data::json->>'node', '') WHERE data LIKE '%"node":%';
	CREATE INDEX IF NOT EXISTS microvms_by_node ON microvms (node, state);`
