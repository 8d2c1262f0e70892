package metrics

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func TestClass(t *testing.T) {
	for code, want := range map[int]string{101: "1xx", 200: "2xx", 404: "4xx", 502: "5xx", 99: "other", 600: "other", 499: "4xx"} {
		if got := Class(code); got != want {
			t.Errorf("Class(%d) = %q, want %q", code, got, want)
		}
	}
}

// TestHandler: /metrics parses and reports every state (0 included) from
// the state counter, a failing counter makes the scrape fail rather than
// report zeros, and /readyz names failing checks.
func TestHandler(t *testing.T) {
	h := NewHealth()
	srv := httptest.NewServer(Handler(h))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 1<<16)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp.StatusCode, b.String()
	}
	SetStateCounter(func(context.Context) (map[string]int, error) { return map[string]int{"RUNNING": 3}, nil })
	QuotaRefusals.WithLabelValues("microvms").Inc()
	code, body := get("/metrics")
	if code != 200 {
		t.Fatalf("/metrics = %d", code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	f := fams["kiln_microvms"]
	if f == nil || len(f.Metric) != len(States) {
		t.Fatalf("kiln_microvms = %v", f)
	}
	for _, m := range f.Metric {
		want := 0.0
		if m.Label[0].GetValue() == "RUNNING" {
			want = 3
		}
		if m.Gauge.GetValue() != want {
			t.Errorf("kiln_microvms{state=%s} = %v, want %v", m.Label[0].GetValue(), m.Gauge.GetValue(), want)
		}
	}
	if fams["kiln_quota_refusals_total"] == nil {
		t.Error("kiln_quota_refusals_total missing")
	}
	SetStateCounter(func(context.Context) (map[string]int, error) { return nil, errors.New("database is locked") })
	if code, _ := get("/metrics"); code != 500 {
		t.Errorf("/metrics with a failing store = %d, want 500", code)
	}

	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, _ := get("/readyz"); code != 503 {
		t.Errorf("/readyz before any check = %d, want 503", code)
	}
	h.Set("store", func(context.Context) error { return nil })
	if code, body := get("/readyz"); code != 200 {
		t.Errorf("/readyz = %d %q", code, body)
	}
	h.Set("vm engine", func(context.Context) error { return errors.New("driver gone") })
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "vm engine: driver gone") {
		t.Errorf("/readyz = %d %q, want 503 naming the engine", code, body)
	}
}
