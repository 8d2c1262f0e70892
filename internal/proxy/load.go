package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// LoadTarget is one microVM endpoint to load.
type LoadTarget struct {
	URL   string // https://ID.DOMAIN/path
	Token string // X-aws-proxy-auth
	Port  uint16 // X-aws-proxy-port; 0 = default
}

// LoadOptions for Load: Connections clients, each on its own connection,
// spread round-robin over Targets, sending requests back to back for
// Duration.
type LoadOptions struct {
	Targets     []LoadTarget
	Connections int           // default 200
	Duration    time.Duration // default 60s
	// Endpoint, if set, is the host:port every request dials (the proxy
	// listener), whatever the URL's host resolves to.
	Endpoint string
	RootCAs  *x509.CertPool // trust (DATA_DIR/ca.pem); nil = system roots
	HTTP2    bool
	Timeout  time.Duration // per request; default 30s
}

// LoadResult sums up a Load run.
type LoadResult struct {
	Requests, Failed int64
	P50, P99, Max    time.Duration
	RPS              float64
	Errors           []string // the first few distinct failures
}

func (r LoadResult) String() string {
	s := fmt.Sprintf("requests %d, failed %d, %.0f req/s, p50 %s, p99 %s, max %s",
		r.Requests, r.Failed, r.RPS, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Max.Round(time.Microsecond))
	if len(r.Errors) > 0 {
		s += "\nerrors:\n  " + strings.Join(r.Errors, "\n  ")
	}
	return s
}

// Load drives the endpoint proxy (issue: 200 connections over 10
// microVMs for 60 s must end with zero failures). A request fails on a
// transport error or a status other than 2xx.
func Load(ctx context.Context, o LoadOptions) (LoadResult, error) {
	if len(o.Targets) == 0 {
		return LoadResult{}, fmt.Errorf("no targets")
	}
	if o.Connections <= 0 {
		o.Connections = 200
	}
	if o.Duration <= 0 {
		o.Duration = 60 * time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	var (
		mu    sync.Mutex
		res   LoadResult
		lat   []time.Duration
		seen  = map[string]bool{}
		wg    sync.WaitGroup
		start = time.Now()
	)
	deadline := start.Add(o.Duration)
	for i := 0; i < o.Connections; i++ {
		tgt := o.Targets[i%len(o.Targets)]
		tc := &tls.Config{RootCAs: o.RootCAs}
		if !o.HTTP2 {
			tc.NextProtos = []string{"http/1.1"}
		}
		tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: o.HTTP2, MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1}
		if o.Endpoint != "" {
			var d net.Dialer
			tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
				return d.DialContext(ctx, network, o.Endpoint)
			}
		}
		client := &http.Client{Transport: tr, Timeout: o.Timeout}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer tr.CloseIdleConnections()
			var mine []time.Duration
			var n, failed int64
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				err := loadOnce(ctx, client, tgt)
				n++
				if err != nil {
					failed++
					mu.Lock()
					if k := err.Error(); !seen[k] && len(res.Errors) < 10 {
						seen[k] = true
						res.Errors = append(res.Errors, k)
					}
					mu.Unlock()
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			res.Requests += n
			res.Failed += failed
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.RPS = float64(res.Requests) / time.Since(start).Seconds()
	slices.Sort(lat)
	if len(lat) > 0 {
		res.P50, res.P99, res.Max = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	}
	return res, ctx.Err()
}

func loadOnce(ctx context.Context, c *http.Client, t LoadTarget) error {
	req, err := http.NewRequestWithContext(ctx, "GET", t.URL, nil)
	if err != nil {
		return err
	}
	req.Header.Set(HeaderAuth, t.Token)
	if t.Port != 0 {
		req.Header.Set(HeaderPort, strconv.Itoa(int(t.Port)))
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<20))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d from %s", resp.StatusCode, t.URL)
	}
	return err
}
