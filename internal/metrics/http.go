package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one readiness condition; nil means ready.
type Check func(ctx context.Context) error

// Health holds the readiness checks /readyz runs. Add checks as parts
// start; until a part has added its check it is not counted.
type Health struct {
	mu     sync.Mutex
	checks map[string]Check
}

// NewHealth returns a Health whose named checks must all pass.
func NewHealth() *Health { return &Health{checks: map[string]Check{}} }

// Set adds or replaces the check name.
func (h *Health) Set(name string, c Check) {
	h.mu.Lock()
	h.checks[name] = c
	h.mu.Unlock()
}

// Ready runs every check (each bounded by 2 s) and returns the failures
// by name.
func (h *Health) Ready(ctx context.Context) map[string]error {
	h.mu.Lock()
	checks := make(map[string]Check, len(h.checks))
	for k, v := range h.checks {
		checks[k] = v
	}
	h.mu.Unlock()
	failed := map[string]error{}
	if len(checks) == 0 {
		failed["startup"] = errors.New("nothing has reported ready yet")
	}
	for name, c := range checks {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if err := c(cctx); err != nil {
			failed[name] = err
		}
		cancel()
	}
	return failed
}

// Handler serves /metrics (Registry, Prometheus text format), /healthz
// (200 while the process serves) and /readyz (200 when every check of h
// passes, else 503 naming the failures).
func Handler(h *Health) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(Registry, promhttp.HandlerOpts{Timeout: 10 * time.Second}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		failed := h.Ready(r.Context())
		if len(failed) == 0 {
			fmt.Fprintln(w, "ready")
			return
		}
		names := make([]string, 0, len(failed))
		for n := range failed {
			names = append(names, n)
		}
		sort.Strings(names)
		var b strings.Builder
		for _, n := range names {
			fmt.Fprintf(&b, "%s: %v\n", n, failed[n])
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprint(w, "not ready\n"+b.String())
	})
	return mux
}

// Serve serves Handler(h) on ln until ctx ends.
func Serve(ctx context.Context, ln net.Listener, h *Health) error {
	srv := &http.Server{Handler: Handler(h), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		return nil
	}
}

// DialCheck is ready when addr accepts a TCP connection (a listener of
// this process, such as the endpoint proxy).
func DialCheck(addr string) Check {
	return func(ctx context.Context) error {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("not listening on %s: %w", addr, err)
		}
		c.Close()
		return nil
	}
}
