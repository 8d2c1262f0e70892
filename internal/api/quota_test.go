package api_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

func unlimited() store.Quota {
	return store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: -1}
}

// TestQuotaRace: 20 concurrent RunMicrovm calls through the HTTP API
// against a quota of 5 create exactly 5; the others are refused with
// ServiceQuotaExceededException naming the quota, its limit and its use.
// (With the count and the create in two transactions, as before, more
// than 5 got through.)
func TestQuotaRace(t *testing.T) {
	e := newEnv(t, func(c *api.Config) {
		c.Quota = unlimited()
		c.Quota.Microvms = 5
	})
	e.readyImage("app")
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
			continue
		}
		var ae *awscli.APIError
		if !errors.As(err, &ae) || ae.Type != "ServiceQuotaExceededException" || ae.Status != 402 ||
			!strings.Contains(ae.Message, "quota Microvms") || !strings.Contains(ae.Message, "limit 5, in use 5") {
			t.Errorf("refusal: %v", err)
		}
	}
	n, err := e.st.CountMicrovms(context.Background(), e.key.Account)
	if err != nil {
		t.Fatal(err)
	}
	if ok != 5 || n != 5 {
		t.Fatalf("%d RunMicrovm calls succeeded and %d microVMs stored, want 5 and 5", ok, n)
	}
}

func TestQuotas(t *testing.T) {
	t.Run("memory defaults and overrides", func(t *testing.T) {
		e := newEnv(t, func(c *api.Config) {
			c.Quota = unlimited()
			c.Quota.MemoryMiB = 128
		})
		e.readyImage("app") // the fake build records a 64 MiB snapshot
		e.runningVM(map[string]any{"imageIdentifier": "app"})
		e.runningVM(map[string]any{"imageIdentifier": "app"})
		_, err := do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
		fails(t, err, "ServiceQuotaExceededException", "quota MemoryMiB of account 111111111111 exceeded: limit 128, in use 128, this request needs 64 more")

		// The operator raises this account's limit: it applies at once.
		more := int64(192)
		if err := e.st.SetQuotaOverride(context.Background(), e.key.Account, store.QuotaOverride{MemoryMiB: &more}); err != nil {
			t.Fatal(err)
		}
		e.runningVM(map[string]any{"imageIdentifier": "app"})
		q := e.ok("GET", "/kiln/v1/quota", nil, nil)
		lim := q["limits"].(map[string]any)
		use := q["usage"].(map[string]any)
		if lim["memoryMiB"] != float64(192) || use["memoryMiB"] != float64(192) || use["microvms"] != float64(3) || use["vcpus"] != float64(3) {
			t.Errorf("GET /kiln/v1/quota = %v", q)
		}
	})
	t.Run("builds", func(t *testing.T) {
		e := newEnv(t, func(c *api.Config) {
			c.Quota = unlimited()
			c.Quota.Builds = 0
		})
		_, err := do(t, e.c, "POST", base+"/microvm-images", nil, imageBody("app"))
		fails(t, err, "ServiceQuotaExceededException", "quota ConcurrentBuilds")
		if _, err := e.st.GetImage(context.Background(), e.key.Account, "app"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("a refused image was stored: %v", err)
		}
	})
	t.Run("default quota is not unlimited", func(t *testing.T) {
		e := newEnv(t)
		q := e.ok("GET", "/kiln/v1/quota", nil, nil)
		lim := q["limits"].(map[string]any)
		if lim["microvms"] != float64(api.DefaultQuota.Microvms) || lim["storageBytes"] != float64(api.DefaultQuota.StorageBytes) {
			t.Errorf("default limits = %v", lim)
		}
	})
}

// fullHost is the fake backend on a host with room for one 64 MiB guest.
type fullHost struct {
	lifecycle.Backend
	mu        sync.Mutex
	committed int64
}

func (h *fullHost) AdmitMemory(_ context.Context, mem int64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.committed+mem > 64 {
		return fmt.Errorf("host memory: %d MiB committed, %d requested, %d allowed: %w", h.committed, mem, 64, errdefs.ErrExhausted)
	}
	return nil
}

func (h *fullHost) StartMicrovm(ctx context.Context, m store.Microvm) error {
	if err := h.AdmitMemory(ctx, m.MemoryMiB); err != nil {
		return err
	}
	h.mu.Lock()
	h.committed += m.MemoryMiB
	h.mu.Unlock()
	return h.Backend.StartMicrovm(ctx, m)
}

// TestHostAdmissionRefusal: a backend's host refusal reaches the client
// as a 503 ServiceUnavailableException with its message, and leaves no
// microVM record behind.
func TestHostAdmissionRefusal(t *testing.T) {
	e := newEnv(t)
	h := &fullHost{Backend: e.be}
	srv := api.NewServer(api.Config{EndpointPort: "8443"}, e.st, h)
	e.hs.Config.Handler = srv.Handler()
	e.readyImage("app")
	e.runningVM(map[string]any{"imageIdentifier": "app"})
	_, err := do(t, e.c, "POST", base+"/microvms", nil, map[string]any{"imageIdentifier": "app"})
	fails(t, err, "ServiceUnavailableException", "64 MiB committed, 64 requested, 64 allowed")
	if n, _ := e.st.CountMicrovms(context.Background(), e.key.Account); n != 1 {
		t.Errorf("%d microVMs stored, want 1", n)
	}
}

// TestDeleteBuildingVersion: a version still building may be deleted (the
// backend cancels its build); the image no longer says it is building.
// (Before, the API answered ConflictException until the build ended,
// which with no build deadline could be never.)
func TestDeleteBuildingVersion(t *testing.T) {
	e := newEnv(t)
	e.be.Delay = 300 * time.Millisecond
	e.ok("POST", base+"/microvm-images", nil, imageBody("slow"))
	e.ok("DELETE", base+"/microvm-images/slow/versions/1", nil, nil)
	img := e.ok("GET", base+"/microvm-images/slow", nil, nil)
	if img["state"] != "CREATE_FAILED" {
		t.Errorf("image after deleting its building version: %v", img["state"])
	}
	if !slices.Contains(e.be.Calls(), "DeleteImageVersion slow:1.0") {
		t.Errorf("backend not told: %v", e.be.Calls())
	}
	// A whole image being built may be deleted too.
	e.ok("POST", base+"/microvm-images", nil, imageBody("slow2"))
	e.ok("DELETE", base+"/microvm-images/slow2", nil, nil)
}
