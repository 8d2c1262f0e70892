package postgres

import "testing"

// TestRebind: the shared queries' placeholders become PostgreSQL's, in
// order, ?N keeps its number, and a ? inside a quoted literal stays.
func TestRebind(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{`SELECT 1`, `SELECT 1`},
		{`a = ? AND b = ? LIMIT ?`, `a = $1 AND b = $2 LIMIT $3`},
		{`x <= ?1 UNION y <= ?1 LIMIT ?2`, `x <= $1 UNION y <= $1 LIMIT $2`},
		{`a = '?' AND b = ?`, `a = '?' AND b = $1`},
		{`a = 'it''s ?' AND b = ?`, `a = 'it''s ?' AND b = $1`},
		{`k IN (?,?,?)`, `k IN ($1,$2,$3)`},
	} {
		if got := rebind(tt.in); got != tt.want {
			t.Errorf("rebind(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
