//go:build linux

package e2bbench

import "testing"

func TestStatsOf(t *testing.T) {
	ms := make([]float64, 100)
	for i := range ms {
		ms[i] = float64(100 - i) // 100..1, unsorted
	}
	s := statsOf(ms)
	if s.N != 100 || s.P50 != 50 || s.P99 != 99 || s.Min != 1 || s.Max != 100 {
		t.Fatalf("stats %+v", s)
	}
	if s := statsOf([]float64{7}); s.P50 != 7 || s.P99 != 7 {
		t.Fatalf("one sample: %+v", s)
	}
	if s := statsOf(nil); s.N != 0 {
		t.Fatalf("no samples: %+v", s)
	}
}
