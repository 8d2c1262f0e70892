package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestServerMetricsEndpoint starts `kiln server --metrics-addr` (fake
// backend) and checks /healthz, /readyz (the store answers) and that
// /metrics parses and reports microVMs by state.
func TestServerMetricsEndpoint(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server process")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd, _ := startServer(t, t.TempDir(), "127.0.0.1:0",
		fmt.Sprintf(`KILN_HELPER_OPTS={"MetricsAddr":%q,"GCInterval":60000000000}`, addr))
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	get := func(path string) (int, string) {
		var resp *http.Response
		var err error
		for i := 0; i < 50; i++ {
			if resp, err = http.Get("http://" + addr + path); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, body := get("/readyz"); code != 200 {
		t.Errorf("/readyz = %d %q", code, body)
	}
	code, body := get("/metrics")
	if code != 200 {
		t.Fatalf("/metrics = %d", code)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	f := fams["kiln_microvms"]
	if f == nil || len(f.Metric) != 6 {
		t.Fatalf("kiln_microvms: %v", f)
	}
}
