//go:build linux

package clusterbench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/soakbench"
)

// measureRuns starts o.Runs microVMs on each side, alternating which
// side goes first so that both see the same host, each terminated before
// the next (the clone pools refill in between, as on an idle host).
func measureRuns(ctx context.Context, o Options, cl, srv *side, res *Result) error {
	// One run on each side first, not counted: the first after a build
	// waits for the image's template and clone pool to be made.
	for _, s := range []*side{cl, srv} {
		d, id, err := runToRunning(ctx, s)
		if err != nil {
			return fmt.Errorf("warm-up run on the %s: %w", s.name, err)
		}
		soakbench.Terminate(ctx, s.api, id)
		fmt.Fprintf(o.Progress, "cluster bench: warm-up run on the %s: RUNNING after %.1f ms (not counted)\n", s.name, ms(d))
		time.Sleep(time.Second)
	}
	samples := map[*side][]float64{}
	for i := 0; i < o.Runs; i++ {
		order := []*side{cl, srv}
		if i%2 == 1 {
			order = []*side{srv, cl}
		}
		for _, s := range order {
			d, id, err := runToRunning(ctx, s)
			if err != nil {
				return fmt.Errorf("RunMicrovm to RUNNING on the %s, run %d: %w", s.name, i+1, err)
			}
			soakbench.Terminate(ctx, s.api, id)
			samples[s] = append(samples[s], ms(d))
			fmt.Fprintf(o.Progress, "cluster bench: run %d on the %s: RUNNING after %.1f ms\n", i+1, s.name, ms(d))
			time.Sleep(time.Second) // let the clone pool refill
		}
	}
	res.RunToRunning = compare(samples[cl], samples[srv])
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// runToRunning runs a microVM of the side's image and times RunMicrovm
// until its state is RUNNING.
func runToRunning(ctx context.Context, s *side) (time.Duration, string, error) {
	t0 := time.Now()
	out, err := awscli.Call(ctx, s.api, awscli.Find("RunMicrovm"), map[string]any{"imageIdentifier": s.image})
	if err != nil {
		return 0, "", fmt.Errorf("RunMicrovm: %w", err)
	}
	id, _ := out["microvmId"].(string)
	if id == "" {
		return 0, "", fmt.Errorf("RunMicrovm answered %v", out)
	}
	s.ids = append(s.ids, id)
	for end := t0.Add(3 * time.Minute); time.Now().Before(end); {
		out, err := awscli.Call(ctx, s.api, awscli.Find("GetMicrovm"), map[string]any{"microvmIdentifier": id})
		if err != nil {
			return 0, id, fmt.Errorf("GetMicrovm %s: %w", id, err)
		}
		switch out["state"] {
		case "RUNNING":
			return time.Since(t0), id, nil
		case "TERMINATING", "TERMINATED":
			return 0, id, fmt.Errorf("%s ended before RUNNING: %v", id, out["stateReason"])
		}
		select {
		case <-ctx.Done():
			return 0, id, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return 0, id, fmt.Errorf("%s not RUNNING within 3 minutes", id)
}

// target is one running microVM's endpoint as a client reaches it.
type target struct {
	side    *side
	url     string
	headers map[string]string
	hc      *http.Client
	dials   atomic.Int64 // connections the client opened
}

// measureRequests runs one microVM on each side and loads each with
// o.Clients kept-alive HTTPS clients for o.Rounds rounds, alternating.
func measureRequests(ctx context.Context, o Options, cl, srv *side, res *Result) error {
	var targets []*target
	for _, s := range []*side{cl, srv} {
		t, err := newTarget(ctx, o, s)
		if err != nil {
			return err
		}
		defer t.hc.CloseIdleConnections()
		targets = append(targets, t)
	}
	p50, p99, rps := map[*side][]float64{}, map[*side][]float64{}, map[*side][]float64{}
	for r := 0; r < o.Rounds; r++ {
		order := targets
		if r%2 == 1 {
			order = []*target{targets[1], targets[0]}
		}
		for _, t := range order {
			load(ctx, t, o.Clients, 300*time.Millisecond) // warm the connections
			dials := t.dials.Load()
			l := load(ctx, t, o.Clients, o.Duration)
			l.dials = int(t.dials.Load() - dials)
			s := t.side
			p50[s], p99[s] = append(p50[s], l.p50), append(p99[s], l.p99)
			rps[s] = append(rps[s], l.perSecond)
			tot := &res.RequestTotals.Server
			if s == cl {
				tot = &res.RequestTotals.Cluster
			}
			tot.Requests += l.requests
			tot.Errors += l.errors
			tot.NewConnections += l.dials
			fmt.Fprintf(o.Progress, "cluster bench: round %d through the %s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, %d errors, %d new connections\n",
				r+1, s.name, l.perSecond, l.p50, l.p99, l.errors, l.dials)
			if l.requests == 0 {
				return fmt.Errorf("no request through the %s answered within %v (%d errors: %v)", s.name, o.Duration, l.errors, l.lastErr)
			}
		}
	}
	res.RequestP50 = compare(p50[cl], p50[srv])
	res.RequestP99 = compare(p99[cl], p99[srv])
	res.RequestsPerSecond = compare(rps[cl], rps[srv])
	return nil
}

// newTarget runs a microVM on s, makes an endpoint token for port 8080,
// and waits for its first 200.
func newTarget(ctx context.Context, o Options, s *side) (*target, error) {
	_, id, err := runToRunning(ctx, s)
	if err != nil {
		return nil, fmt.Errorf("the %s's microVM for requests: %w", s.name, err)
	}
	tok, err := awscli.Call(ctx, s.api, awscli.Find("CreateMicrovmAuthToken"), map[string]any{"microvmIdentifier": id,
		"expirationInMinutes": 60, "allowedPorts": []any{map[string]any{"port": 8080}}})
	if err != nil {
		return nil, fmt.Errorf("CreateMicrovmAuthToken on the %s: %w", s.name, err)
	}
	t := &target{side: s, url: "https://" + id + ".microvm.localhost/", headers: map[string]string{}}
	hdrs, _ := tok["authToken"].(map[string]any)
	for k, v := range hdrs {
		t.headers[k] = fmt.Sprint(v)
	}
	if t.hc, err = soakbench.EndpointClient(s.caFile, s.endpoint, o.Clients); err != nil {
		return nil, err
	}
	for end := time.Now().Add(2 * time.Minute); ; {
		err := t.get(ctx)
		if err == nil {
			return t, nil
		}
		if time.Now().After(end) {
			return nil, fmt.Errorf("no 200 from %s through the %s within 2 minutes: %w", t.url, s.name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (t *target) get(ctx context.Context) error {
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		if !i.Reused {
			t.dials.Add(1)
		}
	}})
	req, err := http.NewRequestWithContext(ctx, "GET", t.url, nil)
	if err != nil {
		return err
	}
	for k, v := range t.headers {
		req.Header.Set(k, v)
	}
	resp, err := t.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %s", t.url, resp.Status)
	}
	return nil
}

type loadResult struct {
	requests, errors int
	dials            int // connections opened during the round
	perSecond        float64
	p50, p99         float64 // ms
	lastErr          error
}

// load runs clients workers against t for d; requests cut off by the end
// of the round are not counted.
func load(ctx context.Context, t *target, clients int, d time.Duration) loadResult {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var mu sync.Mutex
	var all []float64
	var res loadResult
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []float64
			var errs int
			var last error
			for ctx.Err() == nil {
				t0 := time.Now()
				err := t.get(ctx)
				if ctx.Err() != nil {
					break
				}
				if err != nil {
					errs++
					last = err
					continue
				}
				lat = append(lat, ms(time.Since(t0)))
			}
			mu.Lock()
			all = append(all, lat...)
			res.errors += errs
			if last != nil {
				res.lastErr = last
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.requests = len(all)
	res.perSecond = round(float64(len(all)) / time.Since(start).Seconds())
	res.p50, res.p99 = percentile(all, 50), percentile(all, 99)
	return res
}

// percentile is the nearest-rank percentile q of xs.
func percentile(xs []float64, q int) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := (len(s)*q+99)/100 - 1
	return round(s[min(max(i, 0), len(s)-1)])
}

func round(x float64) float64 { return float64(int64(x*100+0.5)) / 100 }

func figure(xs []float64) Figure {
	if len(xs) == 0 {
		return Figure{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	for i := range xs {
		xs[i] = round(xs[i])
	}
	return Figure{Median: round(med), Min: round(s[0]), Max: round(s[len(s)-1]), Samples: xs}
}

func compare(cluster, server []float64) Compare {
	c := Compare{Cluster: figure(cluster), Server: figure(server)}
	if c.Server.Median > 0 {
		c.Ratio = round(c.Cluster.Median / c.Server.Median)
	}
	return c
}
