package proxy

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// recordingWaker is a recording stand-in for the VM engine: its state and
// EnsureRunning's answer are set by the test, the calls counted.
type recordingWaker struct {
	running bool
	err     error
	ensured []string
}

func (w *recordingWaker) RunningNow(string) bool { return w.running }
func (w *recordingWaker) EnsureRunning(_ context.Context, id string) error {
	w.ensured = append(w.ensured, id)
	if w.err == nil {
		w.running = true
	}
	return w.err
}

func TestWakeFirst(t *testing.T) {
	for _, tc := range []struct {
		name     string
		running  bool
		err      error
		e2b      bool
		status   int
		body     string
		ensured  int
		servedBy bool
	}{
		{name: "running: served, not woken", running: true, status: 200, body: "served", servedBy: true},
		{name: "suspended since: woken, then served", status: 200, body: "served", ensured: 1, servedBy: true},
		{name: "paused E2B sandbox without autoResume", err: ErrSuspended, e2b: true, status: 502, body: "is paused", ensured: 1},
		{name: "suspended without auto-resume", err: ErrSuspended, status: 503, body: "autoResumeEnabled is false", ensured: 1},
		{name: "gone", err: ErrNotFound, status: 404, body: "not found", ensured: 1},
		{name: "resume failed", err: errors.New("qemu died"), status: 503, body: "unavailable", ensured: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wk := &recordingWaker{running: tc.running, err: tc.err}
			served := false
			h := WakeFirst(wk, tc.e2b, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				served = true
				if MicrovmID(r.Context()) != "mvm-1" {
					t.Errorf("the handler sees microVM %q", MicrovmID(r.Context()))
				}
				w.Write([]byte("served"))
			}))
			req := httptest.NewRequest("GET", "/files?path=/x", nil)
			req = req.WithContext(WithTarget(req.Context(), "mvm-1", "111111111111"))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.status || !strings.Contains(rec.Body.String(), tc.body) {
				t.Errorf("got %d %q, want %d with %q", rec.Code, rec.Body, tc.status, tc.body)
			}
			if served != tc.servedBy || len(wk.ensured) != tc.ensured {
				t.Errorf("served %v, woken %v; want served %v, woken %d times", served, wk.ensured, tc.servedBy, tc.ensured)
			}
		})
	}
}
