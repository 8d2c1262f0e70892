package sqlite

// Lifecycle events and usage metering (internal/store/events.go).

// migrationUsageNode records which host metered an interval, so that a
// restarted node closes only its own open intervals.
const migrationUsageNode = `ALTER TABLE usage_intervals ADD COLUMN node TEXT NOT NULL DEFAULT '';
	CREATE INDEX IF NOT EXISTS usage_open_by_node ON usage_intervals (node) WHERE open = 1;`

// migrationEventsUsage is the schema of events and usage intervals.
const migrationEventsUsage = `CREATE TABLE IF NOT EXISTS events (
		seq INTEGER PRIMARY KEY,
		account TEXT NOT NULL,
		kind TEXT NOT NULL,
		resource TEXT NOT NULL,
		version TEXT NOT NULL DEFAULT '',
		from_state TEXT NOT NULL DEFAULT '',
		state TEXT NOT NULL,
		reason TEXT NOT NULL DEFAULT '',
		at INTEGER NOT NULL
	);
	CREATE INDEX IF NOT EXISTS events_by_resource ON events (account, kind, resource, version, seq);
	CREATE TABLE IF NOT EXISTS usage_intervals (
		key TEXT PRIMARY KEY,
		account TEXT NOT NULL,
		resource TEXT NOT NULL,
		kind TEXT NOT NULL,
		vcpus INTEGER NOT NULL,
		memory_mib INTEGER NOT NULL,
		start_at INTEGER NOT NULL,
		end_at INTEGER NOT NULL,
		open INTEGER NOT NULL
	);
	CREATE INDEX IF NOT EXISTS usage_by_account ON usage_intervals (account, end_at);
	CREATE INDEX IF NOT EXISTS usage_open ON usage_intervals (open) WHERE open = 1;`
