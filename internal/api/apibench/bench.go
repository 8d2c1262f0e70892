// Package apibench measures the API server: concurrent SigV4-signed clients
// calling GetMicrovm, ListMicrovms and RunMicrovm against a store holding
// many microVM records, reporting throughput and latency percentiles.
//
// RunMicrovm goes through the real API and store (validation, image
// lookup, the quota check and the create in one transaction) but starts
// no VM: the backend is internal/api/fakebackend, which reports RUNNING a
// millisecond later (one more store write). Its results say so (Backend).
package apibench

import (
	"context"
	cryptorand "crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/api/fakebackend"
	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/postgres"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// Options configure a run.
type Options struct {
	Clients  int           // concurrent signed clients
	Records  int           // microVM records in the store
	Duration time.Duration // per measured operation
	PageSize int           // maxResults of ListMicrovms
	Dir      string        // scratch directory for the database
	// Store is "sqlite" (or ""): SQLite only; "postgres": SQLite, then
	// PostgreSQL in a private cluster (internal/store/postgres/pglocal);
	// a postgres:// URL: SQLite, then that (empty, disposable) database.
	Store string
}

// Result is one operation's figures.
type Result struct {
	Store     string        `json:"store"`
	Operation string        `json:"operation"`
	Requests  int           `json:"requests"`
	Errors    int           `json:"errors"`
	PerSecond float64       `json:"requestsPerSecond"`
	P50       time.Duration `json:"-"`
	P99       time.Duration `json:"-"`
	Max       time.Duration `json:"-"`
	P50Ms     float64       `json:"p50Ms"`
	P99Ms     float64       `json:"p99Ms"`
	MaxMs     float64       `json:"maxMs"`
	// Backend says what stood behind the API where it matters: RunMicrovm
	// starts no VM here.
	Backend string `json:"backend,omitempty"`
}

// FakeBackend labels RunMicrovm's results: what they measure and what not.
const FakeBackend = "API+store only, no VM (fake backend: quota check and create in one transaction, RUNNING reported 1 ms later; an account starting with no microVMs)"

func (r Result) String() string {
	return fmt.Sprintf("%-8s %-13s %8d requests %6d errors %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms",
		r.Store, r.Operation, r.Requests, r.Errors, r.PerSecond, ms(r.P50), ms(r.P99), ms(r.Max))
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// Run measures each store o.Store names in turn: it seeds a fresh store,
// serves the API on a loopback port and measures. Progress goes to log.
func Run(ctx context.Context, o Options, log io.Writer) ([]Result, error) {
	dir, err := os.MkdirTemp(o.Dir, "kiln-apibench-")
	if err != nil {
		return nil, fmt.Errorf("creating scratch directory: %w", err)
	}
	defer os.RemoveAll(dir)
	st, err := sqlite.Open(ctx, filepath.Join(dir, "kiln.db"))
	if err != nil {
		return nil, err
	}
	defer st.Close()
	out, err := runStore(ctx, o, "sqlite", st, log)
	if err != nil || o.Store == "" || o.Store == "sqlite" {
		return out, err
	}
	url := o.Store
	if o.Store == "postgres" {
		var stop func()
		if url, stop, err = startPostgres(ctx); err != nil {
			return out, err
		}
		defer stop()
	} else if !postgres.IsURL(o.Store) {
		return out, fmt.Errorf("--store must be sqlite, postgres or a postgres:// URL")
	}
	key := make([]byte, seal.KeySize)
	cryptorand.Read(key)
	sl, err := seal.New(key)
	if err != nil {
		return out, err
	}
	pg, err := postgres.Open(ctx, url, sl)
	if err != nil {
		return out, err
	}
	defer pg.Close()
	res, err := runStore(ctx, o, "postgres", pg, log)
	return append(out, res...), err
}

func runStore(ctx context.Context, o Options, name string, st store.Store, log io.Writer) ([]Result, error) {
	key, err := auth.NewAccessKey("123456789012", "bench")
	if err != nil {
		return nil, err
	}
	if err := st.CreateAccessKey(ctx, key); err != nil {
		return nil, err
	}
	t0 := time.Now()
	ids, err := seed(ctx, st, key.Account, o.Records)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "%s: seeded %d microVM records in %s\n", name, len(ids), time.Since(t0).Round(time.Millisecond))

	// RunMicrovm runs in an account of its own: the quota check counts the
	// account's live microVMs, and the seeded records (one tenant with
	// thousands running, far past any quota) would measure that count.
	runner, err := auth.NewAccessKey("210987654321", "bench-run")
	if err != nil {
		return nil, err
	}
	if err := st.CreateAccessKey(ctx, runner); err != nil {
		return nil, err
	}
	image, err := seedImage(ctx, st, runner.Account)
	if err != nil {
		return nil, err
	}
	be := fakebackend.New(lifecycle.NewReporter(st), time.Millisecond)
	// Quotas high enough that no run is refused: the check itself (a count
	// over the account's live microVMs, growing with every run) is what is
	// measured, in the same transaction as the create.
	unbounded := store.Quota{Microvms: 1 << 40, MemoryMiB: 1 << 50, VCPUs: 1 << 40, Builds: 1 << 20, StorageBytes: 1 << 60}
	srv := api.NewServer(api.Config{Quota: unbounded}, st, be)
	defer be.Wait()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening: %w", err)
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	defer hs.Close()

	tr := &http.Transport{MaxIdleConns: o.Clients * 2, MaxIdleConnsPerHost: o.Clients * 2, IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	clientOf := func(k store.AccessKey) func() *awscli.Client {
		return func() *awscli.Client {
			c := awscli.NewClient("http://"+ln.Addr().String(), "us-east-1", auth.Credentials{AccessKeyID: k.ID, SecretAccessKey: k.Secret})
			c.HTTP = &http.Client{Transport: tr, Timeout: 30 * time.Second}
			return c
		}
	}
	get := func(ctx context.Context, c *awscli.Client, r *rand.Rand) error {
		id := ids[r.IntN(len(ids))]
		b, err := c.Do(ctx, "GET", "/2025-09-09/microvms/"+id, nil, nil)
		if err != nil {
			return err
		}
		var m struct{ MicrovmID string }
		if err := json.Unmarshal(b, &m); err != nil || m.MicrovmID != id {
			return fmt.Errorf("GetMicrovm answered %q for %s", m.MicrovmID, id)
		}
		return nil
	}
	list := func(ctx context.Context, c *awscli.Client, r *rand.Rand) error {
		_, err := c.Do(ctx, "GET", "/2025-09-09/microvms", url.Values{"maxResults": {fmt.Sprint(o.PageSize)}}, nil)
		return err
	}
	run := func(ctx context.Context, c *awscli.Client, r *rand.Rand) error {
		b, err := c.Do(ctx, "POST", "/2025-09-09/microvms", nil, []byte(`{"imageIdentifier":"`+image+`"}`))
		if err != nil {
			return err
		}
		var m struct{ MicrovmID string }
		if err := json.Unmarshal(b, &m); err != nil || m.MicrovmID == "" {
			return fmt.Errorf("RunMicrovm answered %.200q", b)
		}
		return nil
	}
	var out []Result
	for _, op := range []struct {
		name string
		key  store.AccessKey
		fn   func(context.Context, *awscli.Client, *rand.Rand) error
	}{{"GetMicrovm", key, get}, {"ListMicrovms", key, list}, {"RunMicrovm", runner, run}} {
		// A short warm-up fills connection pools and caches.
		measure(ctx, o.Clients, 300*time.Millisecond, clientOf(op.key), op.fn)
		res := measure(ctx, o.Clients, o.Duration, clientOf(op.key), op.fn)
		res.Store, res.Operation = name, op.name
		if op.name == "RunMicrovm" {
			res.Backend = FakeBackend
		}
		fmt.Fprintln(log, res)
		out = append(out, res)
	}
	return out, nil
}

// seedImage stores an image with a built, active version to run.
func seedImage(ctx context.Context, st store.Store, account string) (string, error) {
	const name = "bench"
	now := time.Now().UTC()
	img := store.Image{Account: account, Name: name, ARN: "arn:aws:lambda:us-east-1:" + account + ":microvm-image:" + name,
		State: store.ImageCreated, LatestVersion: "1", LatestActiveVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: account, ImageName: name, ImageARN: img.ARN, Version: "1",
		State: store.VersionSuccessful, Status: store.VersionActive, CreatedAt: now, UpdatedAt: now}
	if err := st.CreateImage(ctx, img, v, nil, nil); err != nil {
		return "", fmt.Errorf("seeding the image: %w", err)
	}
	return name, nil
}

// seed stores n RUNNING microVMs, in a few concurrent writers so the
// single-writer store's commits are the only limit.
func seed(ctx context.Context, st store.Store, account string, n int) ([]string, error) {
	now := time.Now().UTC()
	ids := make([]string, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				id := fmt.Sprintf("mvm-bench%015d", i)
				ids[i] = id
				idle := &store.IdlePolicy{MaxIdleDurationSeconds: 300, SuspendedDurationSeconds: 3600, AutoResumeEnabled: true}
				m := store.Microvm{ID: id, Account: account, ARN: "arn:aws:lambda:us-east-1:" + account + ":microvm:" + id, State: store.StateRunning,
					Endpoint: "https://" + id + ".microvm.localhost", ImageName: "bench", ImageARN: "arn:aws:lambda:us-east-1:" + account + ":microvm-image:bench",
					ImageVersion: "1", IdlePolicy: idle, MaximumDurationInSeconds: 28800, StartedAt: now, UpdatedAt: now, DeadlineAt: now.Add(8 * time.Hour)}
				if err := st.CreateMicrovm(ctx, m, nil); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, fmt.Errorf("seeding: %w", err)
	}
	return ids, nil
}

func measure(ctx context.Context, clients int, d time.Duration, newClient func() *awscli.Client, fn func(context.Context, *awscli.Client, *rand.Rand) error) Result {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	lat := make([][]time.Duration, clients)
	errs := make([]int, clients)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := newClient()
			r := rand.New(rand.NewPCG(uint64(i), 42))
			for ctx.Err() == nil {
				t := time.Now()
				err := fn(ctx, c, r)
				if ctx.Err() != nil {
					return // cut off by the end of the run: not counted
				}
				lat[i] = append(lat[i], time.Since(t))
				if err != nil {
					errs[i]++
				}
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	res := Result{}
	for i := range lat {
		all = append(all, lat[i]...)
		res.Errors += errs[i]
	}
	slices.Sort(all)
	res.Requests = len(all)
	res.PerSecond = float64(len(all)) / elapsed.Seconds()
	if len(all) > 0 {
		res.P50 = all[len(all)*50/100]
		res.P99 = all[len(all)*99/100]
		res.Max = all[len(all)-1]
		res.P50Ms, res.P99Ms, res.MaxMs = ms(res.P50), ms(res.P99), ms(res.Max)
	}
	return res
}
