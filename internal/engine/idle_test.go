//go:build linux

package engine

import (
	"testing"
	"time"
)

func TestIdleDue(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	min := time.Minute
	tests := []struct {
		name       string
		running    bool
		open       int
		lastActive time.Time
		recorded   time.Time
		maxIdle    time.Duration
		want       bool
	}{
		{name: "idle past the limit", running: true, lastActive: now.Add(-2 * min), want: true, maxIdle: min},
		{name: "exactly at the limit", running: true, lastActive: now.Add(-min), want: true, maxIdle: min},
		{name: "active recently", running: true, lastActive: now.Add(-30 * time.Second), maxIdle: min},
		{name: "open connection keeps it up", running: true, open: 1, lastActive: now.Add(-time.Hour), maxIdle: min},
		{name: "not running", running: false, lastActive: now.Add(-time.Hour), maxIdle: min},
		{name: "no idle policy", running: true, lastActive: now.Add(-time.Hour)},
		{name: "after a restart the store's time counts", running: true, recorded: now.Add(-2 * min), want: true, maxIdle: min},
		{name: "store recorded recent activity", running: true, lastActive: now.Add(-time.Hour), recorded: now.Add(-10 * time.Second), maxIdle: min},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := idleDue(now, tc.running, tc.open, tc.lastActive, tc.recorded, tc.maxIdle); got != tc.want {
				t.Errorf("idleDue = %v, want %v", got, tc.want)
			}
		})
	}
}
