//go:build linux

package imagebench

import (
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/imagebuild"
)

func TestAptParts(t *testing.T) {
	var log strings.Builder
	m := &markWriter{w: &log, start: time.Now(), at: map[string]time.Time{}}
	// Markers split across writes and mixed with apt's output.
	for _, w := range []string{"Get:0 before\nkiln-bench: apt-", "get update\nHit:1 x\n", "Fetched 1 kB\nReading package lists...\n",
		"kiln-bench: apt-get install\r\n", "Reading package lists...\nGet:1 y\n", "Unpacking\nkiln-bench: done\n", "kiln-bench: apt-get update\n"} {
		if _, err := m.Write([]byte(w)); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(log.String(), "\n"); n != 11 || !strings.Contains(log.String(), " Hit:1 x\n") {
		t.Errorf("log lines not passed through with times: %q", log.String())
	}
	for _, k := range []string{markUpdate, markInstall, markDone, markFetched, markLists} {
		if m.at[k].IsZero() {
			t.Errorf("marker %q not seen", k)
		}
	}
	// Only apt-get update's own download and list lines count.
	if m.at[markFetched].After(m.at[markInstall]) || m.at[markLists].After(m.at[markInstall]) || m.at[markFetched].Before(m.at[markUpdate]) {
		t.Errorf("update's lines timed outside it: %v", m.at)
	}
	// Fixed times, to check the arithmetic.
	t0 := time.Unix(1000, 0)
	m.at = map[string]time.Time{markUpdate: t0, markFetched: t0.Add(time.Second), markLists: t0.Add(2500 * time.Millisecond),
		markInstall: t0.Add(3 * time.Second), markDone: t0.Add(5 * time.Second)}
	s := image.StepReport{Line: 3, Duration: 20 * time.Second}
	steps := []imagebuild.StepTimes{{Line: 2, Boot: time.Hour}, {Line: 3, Inspect: time.Second, Boot: 4 * time.Second, Exec: 6 * time.Second, Stop: time.Second, Commit: 2 * time.Second, Finish: time.Second}}
	got := aptParts(s, steps, m.at)
	want := AptStepTimes{HostMs: 5000, InspectMs: 1000, BootMs: 4000, MountsMs: 1000, UpdateMs: 3000, UpdateFetchMs: 1000, UpdateCacheMs: 1500, InstallMs: 2000, StopMs: 1000, CommitMs: 2000, FinishMs: 1000}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
}
