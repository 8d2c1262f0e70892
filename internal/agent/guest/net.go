//go:build linux

package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

const maxWait = 10 * time.Minute

func boundedTimeout(ms int64, def time.Duration) time.Duration {
	d := time.Duration(ms) * time.Millisecond
	if d <= 0 {
		d = def
	}
	return min(d, maxWait)
}

func validPort(p int) error {
	if p <= 0 || p > 65535 {
		return fmt.Errorf("invalid port %d", p)
	}
	return nil
}

// waitPort polls until something accepts TCP on 127.0.0.1:port.
func waitPort(ctx context.Context, req proto.WaitPortRequest) error {
	if err := validPort(req.Port); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, boundedTimeout(req.TimeoutMillis, 30*time.Second))
	defer cancel()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(req.Port))
	var d net.Dialer
	for {
		attempt, cancelAttempt := context.WithTimeout(ctx, time.Second)
		c, err := d.DialContext(attempt, "tcp", addr)
		cancelAttempt()
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for port %d: %w (last error: %v)", req.Port, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// doHTTP makes one HTTP request to 127.0.0.1:port, for lifecycle hooks and
// health checks. The response body is bounded.
func doHTTP(ctx context.Context, req proto.HTTPRequest) (proto.HTTPResult, error) {
	if err := validPort(req.Port); err != nil {
		return proto.HTTPResult{}, err
	}
	method := strings.ToUpper(req.Method)
	if method == "" {
		method = http.MethodGet
	}
	path := req.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	ctx, cancel := context.WithTimeout(ctx, boundedTimeout(req.TimeoutMillis, 30*time.Second))
	defer cancel()
	url := "http://127.0.0.1:" + strconv.Itoa(req.Port) + path
	hreq, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(req.Body))
	if err != nil {
		return proto.HTTPResult{}, fmt.Errorf("building http request: %w", err)
	}
	if len(req.Body) > 0 {
		hreq.Header.Set("Content-Type", "application/json")
	}
	tr := &http.Transport{Proxy: nil, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}).Do(hreq)
	if err != nil {
		return proto.HTTPResult{}, fmt.Errorf("http %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, proto.MaxHTTPBody+1))
	if err != nil && !errors.Is(err, io.EOF) {
		return proto.HTTPResult{}, fmt.Errorf("reading http response: %w", err)
	}
	res := proto.HTTPResult{Status: resp.StatusCode, Body: body}
	if len(body) > proto.MaxHTTPBody {
		res.Body, res.Truncated = body[:proto.MaxHTTPBody], true
	}
	return res, nil
}
