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

func TestRing(t *testing.T) {
	var r ring
	r.Write([]byte("hello "))
	r.Write([]byte("world"))
	tests := []struct {
		name     string
		off      int64
		limit    int
		want     string
		wantNext int64
	}{
		{name: "from the start", off: 0, limit: 100, want: "hello world", wantNext: 11},
		{name: "from an offset", off: 6, limit: 100, want: "world", wantNext: 11},
		{name: "limited", off: 0, limit: 5, want: "hello", wantNext: 5},
		{name: "at the end", off: 11, limit: 100, want: "", wantNext: 11},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, next := r.read(tc.off, tc.limit)
			if string(got) != tc.want || next != tc.wantNext {
				t.Errorf("read(%d, %d) = %q, %d; want %q, %d", tc.off, tc.limit, got, next, tc.want, tc.wantNext)
			}
		})
	}
	big := make([]byte, logCap+10)
	r.Write(big)
	// 11+logCap+10 bytes written, logCap kept: the oldest is at 21.
	if got, next := r.read(0, 1); next != 22 || len(got) != 1 {
		t.Errorf("after overflow, read(0) = %d bytes, next %d; want the oldest kept byte (offset 21)", len(got), next)
	}
}
