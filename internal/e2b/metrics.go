package e2b

import (
	"context"
	"errors"
	"math"
	"net/url"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Meter measures a running sandbox's VM (the engine).
type Meter interface {
	Usage(ctx context.Context, id string) (vmm.Usage, error)
}

// cpuSample is how long the CPU time of a sandbox is watched to compute
// its CPU use: two readings of the process's CPU time, this far apart.
const cpuSample = 250 * time.Millisecond

// metric is E2B's SandboxMetric. memCache is left out: the host cannot
// see the guest's page cache, and an invented zero would read as a
// measurement.
type metric struct {
	Timestamp     string  `json:"timestamp"`
	TimestampUnix int64   `json:"timestampUnix"`
	CPUCount      int64   `json:"cpuCount"`
	CPUUsedPct    float64 `json:"cpuUsedPct"`
	MemUsed       int64   `json:"memUsed"`
	MemTotal      int64   `json:"memTotal"`
	DiskUsed      int64   `json:"diskUsed"`
	DiskTotal     int64   `json:"diskTotal"`
}

// parseMetricsRange reads the start and end query parameters (Unix
// seconds, both optional).
func parseMetricsRange(q url.Values) (start, end int64, err error) {
	start, end = math.MinInt64, math.MaxInt64
	for _, p := range []struct {
		name string
		v    *int64
	}{{"start", &start}, {"end", &end}} {
		s := q.Get(p.name)
		if s == "" {
			continue
		}
		n, perr := strconv.ParseInt(s, 10, 64)
		if perr != nil || n < 0 {
			return 0, 0, errorf(400, "%s must be a Unix time in seconds, not %q", p.name, s)
		}
		*p.v = n
	}
	if start > end {
		return 0, 0, errorf(400, "start (%d) is after end (%d)", start, end)
	}
	return start, end, nil
}

// metrics answers GET /sandboxes/{id}/metrics with one entry measured
// now (kiln keeps no history): a paused sandbox, or a time range that
// does not hold now, has none.
func (s *Server) metrics(ctx context.Context, q *request) (int, any, error) {
	start, end, err := parseMetricsRange(q.r.URL.Query())
	if err != nil {
		return 0, nil, err
	}
	id := q.r.PathValue("id")
	_, m, err := s.sandboxOf(ctx, q.key.Account, id)
	if err != nil {
		return 0, nil, err
	}
	out := []metric{}
	if now := s.cfg.Now().Unix(); m.State != store.StateRunning || now < start || now > end {
		return 200, out, nil
	}
	if s.cfg.Meter == nil {
		return 0, nil, errorf(501, "this kiln server cannot measure sandboxes (its backend has no VM engine)")
	}
	a, err := s.cfg.Meter.Usage(ctx, id)
	if err == nil {
		select {
		case <-ctx.Done():
			return 0, nil, ctx.Err()
		case <-time.After(cpuSample):
		}
	}
	var b vmm.Usage
	if err == nil {
		b, err = s.cfg.Meter.Usage(ctx, id)
	}
	if errors.Is(err, errdefs.ErrNotFound) || errors.Is(err, errdefs.ErrConflict) {
		return 200, out, nil // it stopped running meanwhile
	}
	if err != nil {
		return 0, nil, err
	}
	return 200, append(out, metricOf(a, b, max(m.VCPUs, 1))), nil
}

// metricOf makes E2B's metric from two readings: CPU use is the share of
// the vCPUs' time the VM's process used between them.
func metricOf(a, b vmm.Usage, vcpus int64) metric {
	pct := 0.0
	if dt := b.At.Sub(a.At); dt > 0 && b.CPUTime >= a.CPUTime {
		pct = float64(b.CPUTime-a.CPUTime) / float64(dt) / float64(vcpus) * 100
		pct = math.Round(pct*100) / 100
	}
	return metric{Timestamp: b.At.UTC().Format(time.RFC3339Nano), TimestampUnix: b.At.Unix(), CPUCount: vcpus, CPUUsedPct: pct,
		MemUsed: b.ResidentBytes, MemTotal: b.MemorySize, DiskUsed: b.DiskAllocated, DiskTotal: b.DiskSize}
}
