package api

import (
	"testing"
	"time"
)

func TestParseSince(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Time
		bad  bool
	}{
		{in: "2026-02-28T12:00:00Z", want: now.Add(-24 * time.Hour)},
		{in: "24h", want: now.Add(-24 * time.Hour)},
		{in: "7d", want: now.Add(-7 * 24 * time.Hour)},
		{in: "1772366400", want: now},
		{in: "yesterday", bad: true},
		{in: "-5h", bad: true},
		{in: "0000-01-01T00:00:00Z", want: time.Unix(0, 0)},
		{in: "2999-01-01T00:00:00Z", bad: true},
		{in: "", bad: true},
	}
	for _, tc := range tests {
		got, err := ParseSince(tc.in, now)
		if (err != nil) != tc.bad || (!tc.bad && !got.Equal(tc.want)) {
			t.Errorf("ParseSince(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// FuzzParseSince: whatever a client sends as since/until parses to a time
// the store can hold (UnixNano in range) or is refused.
func FuzzParseSince(f *testing.F) {
	for _, s := range []string{"24h", "7d", "0", "2026-01-01T00:00:00Z", "99999999999d", "9223372036854775807", "1e9h", "-1"} {
		f.Add(s)
	}
	now := time.Now()
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseSince(s, now)
		if err != nil {
			return
		}
		if got.Before(time.Unix(0, 0)) || got.Year() >= 2200 {
			t.Fatalf("ParseSince(%q) = %v: outside [1970, 2200)", s, got)
		}
	})
}
