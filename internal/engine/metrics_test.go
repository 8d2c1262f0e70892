//go:build linux

package engine_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// scrape fetches /metrics and parses it with the Prometheus text parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// value is a counter's or gauge's value, or a histogram's count, of the
// series of family name whose labels include want.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	var sum float64
next:
	for _, m := range f.Metric {
		for k, v := range want {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	return sum
}

// TestMetricsMove runs, suspends and resumes (through the endpoint, an
// auto-resume) a real microVM and checks that /metrics parses and its
// series move; /healthz answers and /readyz follows its checks.
func TestMetricsMove(t *testing.T) {
	h := newHarness(t)
	metrics.SetStateCounter(func(ctx context.Context) (map[string]int, error) {
		n, err := h.st.CountMicrovmsByState(ctx)
		out := map[string]int{}
		for k, v := range n {
			out[string(k)] = v
		}
		return out, err
	})
	health := metrics.NewHealth()
	srv := httptest.NewServer(metrics.Handler(health))
	defer srv.Close()

	before := scrape(t, srv.URL)
	m := h.run([]string{allIngress}, &store.IdlePolicy{MaxIdleDurationSeconds: 600, SuspendedDurationSeconds: 600, AutoResumeEnabled: true})
	tok := h.token(m.ID)
	if code, body := h.get(m.ID, "/count", tok, nil); code != 200 {
		t.Fatalf("GET: %d %q", code, body)
	}
	h.get(m.ID, "/count", "not-a-token", nil) // a 401 from the proxy itself
	// From now on the hooks port answers nothing: the suspend and resume
	// hooks fail (logged, not fatal) and are counted. The engine takes
	// the hooks from the record it is handed (RunMicrovm's copy).
	dead := int64(9)
	if _, err := h.st.UpdateMicrovm(context.Background(), testAccount, m.ID, nil, func(r *store.Microvm) error {
		hk := *r.Hooks
		hk.Port = &dead
		r.Hooks = &hk
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := h.srv.Suspend(context.Background(), testAccount, m.ID, "UserRequested: test"); err != nil {
		t.Fatal(err)
	}
	h.wait(m.ID, store.StateSuspended, 60*time.Second)
	mid := scrape(t, srv.URL)
	if code, body := h.get(m.ID, "/count", tok, nil); code != 200 || body != "count=2" {
		t.Fatalf("auto-resume: %d %q", code, body)
	}
	h.eng.UpdateMemoryMetric(context.Background())
	after := scrape(t, srv.URL)

	moved := func(name string, labels map[string]string, from, to map[string]*dto.MetricFamily, min float64) {
		t.Helper()
		if d := value(to, name, labels) - value(from, name, labels); d < min {
			t.Errorf("%s%v moved by %v, want at least %v", name, labels, d, min)
		}
	}
	moved("kiln_microvm_run_to_running_seconds", nil, before, after, 1)
	moved("kiln_microvm_clone_seconds", nil, before, after, 1)
	moved("kiln_microvm_suspend_seconds", nil, before, mid, 1)
	moved("kiln_microvm_resume_seconds", nil, mid, after, 1)
	moved("kiln_microvm_auto_resume_seconds", nil, mid, after, 1)
	moved("kiln_proxy_requests_total", map[string]string{"class": "2xx"}, before, after, 2)
	moved("kiln_proxy_errors_total", map[string]string{"class": "4xx"}, before, after, 1)
	moved("kiln_proxy_response_bytes_total", map[string]string{"class": "2xx"}, before, after, float64(len("count=1count=2")))
	moved("kiln_hook_failures_total", map[string]string{"hook": "suspend"}, before, mid, 1)
	moved("kiln_hook_failures_total", map[string]string{"hook": "resume"}, mid, after, 1)
	moved("kiln_store_operation_seconds", map[string]string{"op": "write"}, before, after, 3)
	if v := value(mid, "kiln_microvms", map[string]string{"state": "SUSPENDED"}); v < 1 {
		t.Errorf("kiln_microvms{state=SUSPENDED} = %v while one is suspended", v)
	}
	if v := value(after, "kiln_microvms", map[string]string{"state": "RUNNING"}); v < 1 {
		t.Errorf("kiln_microvms{state=RUNNING} = %v after the resume", v)
	}
	if v := value(after, "kiln_host_guest_memory_committed_bytes", nil); v < 256<<20 {
		t.Errorf("kiln_host_guest_memory_committed_bytes = %v with a 256 MiB guest running", v)
	}
	if _, ok := after["kiln_host_guest_memory_allowed_bytes"]; !ok {
		t.Error("kiln_host_guest_memory_allowed_bytes missing from /metrics")
	}
	for _, f := range after {
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == "account" || l.GetName() == "microvm" {
					t.Errorf("%s is labelled by %s: unbounded cardinality", f.GetName(), l.GetName())
				}
			}
		}
	}

	get := func(path string) int {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if c := get("/healthz"); c != 200 {
		t.Errorf("/healthz = %d", c)
	}
	if c := get("/readyz"); c != 503 {
		t.Errorf("/readyz with no checks yet = %d, want 503", c)
	}
	health.Set("vm engine", h.eng.Ready)
	health.Set("endpoint proxy", metrics.DialCheck(h.addr))
	if c := get("/readyz"); c != 200 {
		t.Errorf("/readyz with engine and proxy up = %d, want 200", c)
	}
	health.Set("endpoint proxy", metrics.DialCheck("127.0.0.1:1"))
	if c := get("/readyz"); c != 503 {
		t.Errorf("/readyz with the proxy down = %d, want 503", c)
	}
}
