package e2b

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// halfBusy is a Meter (kiln's own interface) whose VMs use half a vCPU:
// each reading's CPU time is half the time since the first.
type halfBusy struct {
	mu    sync.Mutex
	first map[string]time.Time
}

func (h *halfBusy) Usage(_ context.Context, id string) (vmm.Usage, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	if h.first[id].IsZero() {
		h.first[id] = now
	}
	return vmm.Usage{At: now, CPUTime: now.Sub(h.first[id]) / 2, ResidentBytes: 300 << 20, MemorySize: 512 << 20,
		DiskAllocated: 7 << 20, DiskSize: 1 << 30}, nil
}

type noVM struct{}

func (noVM) Usage(context.Context, string) (vmm.Usage, error) {
	return vmm.Usage{}, fmt.Errorf("vm: %w", errdefs.ErrNotFound)
}

// TestMetrics: a running sandbox has one entry measured now, its CPU use
// from two readings; a paused one, or a range without now, none.
func TestMetrics(t *testing.T) {
	e := newEnv(t)
	e.srv.cfg.Meter = &halfBusy{first: map[string]time.Time{}}
	id := e.create(map[string]any{"templateID": "tmpl", "timeout": 300})
	path := "/sandboxes/" + id + "/metrics"

	var ms []metric
	a := e.do(e.key, "GET", path, nil)
	e.want(a, 200, "metrics")
	a.json(t, &ms)
	if len(ms) != 1 {
		t.Fatalf("metrics: %s", a.body)
	}
	m := ms[0]
	if m.CPUCount < 1 || m.CPUUsedPct < 40 || m.CPUUsedPct > 60 || m.MemUsed != 300<<20 || m.MemTotal != 512<<20 ||
		m.DiskUsed != 7<<20 || m.DiskTotal != 1<<30 || time.Since(time.Unix(m.TimestampUnix, 0)) > time.Minute {
		t.Fatalf("metric %+v, want half a vCPU busy and the meter's sizes", m)
	}
	if _, err := time.Parse(time.RFC3339Nano, m.Timestamp); err != nil {
		t.Fatalf("timestamp %q: %v", m.Timestamp, err)
	}
	past := url.Values{"start": {"1000"}, "end": {"2000"}}.Encode()
	e.do(e.key, "GET", path+"?"+past, nil).json(t, &ms)
	if len(ms) != 0 {
		t.Fatalf("metrics of a range in the past: %+v", ms)
	}
	e.want(e.do(e.key, "GET", path+"?start=x", nil), 400, "bad start")
	e.want(e.do(e.key, "GET", path+"?start=20&end=10", nil), 400, "start after end")
	e.want(e.do(e.otherKey, "GET", path, nil), 404, "another account's sandbox")

	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/pause", nil), 204, "pause")
	e.do(e.key, "GET", path, nil).json(t, &ms)
	if len(ms) != 0 {
		t.Fatalf("metrics of a paused sandbox: %+v", ms)
	}
	e.want(e.do(e.key, "POST", "/sandboxes/"+id+"/connect", map[string]any{"timeout": 60}), 201, "connect")
	e.srv.cfg.Meter = noVM{}
	e.do(e.key, "GET", path, nil).json(t, &ms)
	if len(ms) != 0 {
		t.Fatalf("metrics of a sandbox whose VM is gone: %+v", ms)
	}
}

func FuzzParseMetricsRange(f *testing.F) {
	f.Add("start=1700000000&end=1800000000")
	f.Add("start=-1")
	f.Add("end=99999999999999999999&start=5")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		start, end, err := parseMetricsRange(q)
		if err == nil && start > end {
			t.Fatalf("accepted start %d after end %d", start, end)
		}
	})
}
