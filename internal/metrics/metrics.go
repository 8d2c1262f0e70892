// Package metrics holds kiln's Prometheus collectors and the operator's
// HTTP endpoint (/metrics, /healthz, /readyz). The collectors are
// package-level so that any part of kiln can count without plumbing:
// metrics.QuotaRefusals.WithLabelValues("microvms").Inc().
//
// No collector is labelled by account or microVM id: with many tenants
// that would grow the series without bound. Labels take values from small
// fixed sets (a state, a hook, a status class, a kind).
package metrics

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Registry is what /metrics serves: kiln's collectors plus the Go runtime's
// and the process's.
var Registry = prometheus.NewRegistry()

// Latency buckets: from a 10 ms clone under KVM to a minute-long resume
// on a loaded TCG host.
var latencyBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}

// Build buckets: seconds to an hour (a build's whole deadline).
var buildBuckets = []float64{1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600}

func hist(name, help string, buckets []float64) prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
}

var (
	// RunToRunning is the time from RunMicrovm's record to RUNNING
	// (network, clone, run hook).
	RunToRunning = hist("kiln_microvm_run_to_running_seconds", "Time from RunMicrovm to RUNNING.", latencyBuckets)
	// Clone is the driver's restore of a snapshot into a running VM.
	Clone = hist("kiln_microvm_clone_seconds", "Time to restore a microVM from its image's snapshot.", latencyBuckets)
	// Suspend is the engine's suspend (hook and driver).
	Suspend = hist("kiln_microvm_suspend_seconds", "Time to suspend a microVM (suspend hook and snapshot).", latencyBuckets)
	// Resume is the engine's resume (driver and hook), whoever asked.
	Resume = hist("kiln_microvm_resume_seconds", "Time to resume a microVM (restore and resume hook).", latencyBuckets)
	// AutoResume is what a request to a suspended microVM waited before
	// it was forwarded.
	AutoResume = hist("kiln_microvm_auto_resume_seconds", "Time an endpoint request waited for its suspended microVM to resume.", latencyBuckets)
	// BuildDuration is a finished image build, by result (ok, failed).
	BuildDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_image_build_seconds",
		Help: "Duration of finished image builds.", Buckets: buildBuckets}, []string{"result"})

	// ProxyRequests counts endpoint requests by the status class answered
	// (1xx..5xx).
	ProxyRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_proxy_requests_total",
		Help: "Endpoint proxy requests by status class."}, []string{"class"})
	// ProxyErrors counts answers the proxy made itself (bad token, unknown
	// microVM, guest not answering), by status class.
	ProxyErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_proxy_errors_total",
		Help: "Endpoint proxy requests answered with an error by the proxy itself, by status class."}, []string{"class"})
	// ProxyBytes counts response body bytes sent to clients, by status class.
	ProxyBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_proxy_response_bytes_total",
		Help: "Response body bytes the endpoint proxy sent, by status class."}, []string{"class"})

	// HookFailures counts lifecycle hooks that failed or answered non-2xx.
	HookFailures = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_hook_failures_total",
		Help: "Lifecycle hooks that failed, by hook."}, []string{"hook"})
	// QuotaRefusals counts requests refused by a quota or by host
	// admission, by the quota's name.
	QuotaRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_quota_refusals_total",
		Help: "Requests refused by a quota or host admission, by quota."}, []string{"quota"})
	// GuestMemoryCommitted and GuestMemoryAllowed are the host's guest
	// memory in use by running microVMs and build VMs, and the admission
	// limit (0: none set).
	GuestMemoryCommitted = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_host_guest_memory_committed_bytes",
		Help: "Guest memory of the VMs running on this host."})
	GuestMemoryAllowed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_host_guest_memory_allowed_bytes",
		Help: "Guest memory the host admits (0: no limit)."})
	// GCRemovals counts what garbage collection removed or ended, by kind.
	GCRemovals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_gc_removals_total",
		Help: "Entries garbage collection removed, by kind."}, []string{"kind"})
	// StoreOps is the latency of store operations, by kind (read, write).
	StoreOps = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_store_operation_seconds",
		Help: "Latency of state store operations.", Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5}},
		[]string{"op"})
)

// States lists the values of kiln_microvms' state label; every one is
// reported (0 when none), so dashboards see a stable set of series.
var States = []string{"PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING", "TERMINATED"}

// StateCounter counts microVMs by state (store.Store's CountMicrovmsByState).
type StateCounter func(ctx context.Context) (map[string]int, error)

var stateCounter atomic.Pointer[StateCounter]

// SetStateCounter makes kiln_microvms read counts from f at each scrape.
func SetStateCounter(f StateCounter) { stateCounter.Store(&f) }

type stateCollector struct{ desc *prometheus.Desc }

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	f := stateCounter.Load()
	if f == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := (*f)(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for _, s := range States {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n[s]), s)
	}
}

var registerOnce sync.Once

func init() {
	registerOnce.Do(func() {
		Registry.MustRegister(
			collectors.NewGoCollector(),
			collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
			stateCollector{desc: prometheus.NewDesc("kiln_microvms", "MicroVM records by state.", []string{"state"}, nil)},
			RunToRunning, Clone, Suspend, Resume, AutoResume, BuildDuration,
			ProxyRequests, ProxyErrors, ProxyBytes,
			HookFailures, QuotaRefusals, GuestMemoryCommitted, GuestMemoryAllowed,
			GCRemovals, StoreOps,
		)
	})
}

// Class is the status class label of an HTTP status ("2xx").
func Class(code int) string {
	if code < 100 || code > 599 {
		return "other"
	}
	return strconv.Itoa(code/100) + "xx"
}

// Since observes the seconds since start on h.
func Since(h prometheus.Observer, start time.Time) { h.Observe(time.Since(start).Seconds()) }
