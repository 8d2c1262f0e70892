package console

import (
	"context"
	"net/http"
	"slices"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// defaultMemoryMiB and memorySizes mirror imagebuild.DefaultMemoryMiB
// and imagebuild.MemorySizes (a test checks), which this adapter does not
// import: a microVM has its template's memory, the smallest size at least
// minimumMemoryInMiB, or the default when the image asks for none.
const defaultMemoryMiB = 2048

var memorySizes = []int64{512, 1024, 2048, 4096, 8192}

func memoryFor(minMiB int64) int64 {
	if minMiB <= 0 {
		return defaultMemoryMiB
	}
	for _, s := range memorySizes {
		if s >= minMiB {
			return s
		}
	}
	return minMiB
}

// Bounds of what one usage call reads from the store.
const (
	usageMaxMicrovms = 5000
	usageMaxImages   = 500
	recentBuilds     = 20
)

type accountUsage struct {
	Account   string         `json:"account"`
	ByState   map[string]int `json:"microvmsByState"`
	MemoryMiB int64          `json:"memoryCommittedMiB"`
	Images    int            `json:"images"`
	Builds    int            `json:"builds"`
	Failed    int            `json:"failedBuilds"`
}

type buildSummary struct {
	Account     string    `json:"account"`
	Image       string    `json:"image"`
	Version     string    `json:"version"`
	BuildID     string    `json:"buildId"`
	State       string    `json:"buildState"`
	StateReason string    `json:"stateReason,omitempty"`
	CreatedAt   time.Time `json:"createdAt"`
}

type usageOut struct {
	ByState       map[string]int `json:"microvmsByState"`
	MemoryMiB     int64          `json:"memoryCommittedMiB"`
	HostMemoryMiB int64          `json:"hostMemoryMiB,omitempty"`
	Accounts      []accountUsage `json:"accounts"`
	RecentBuilds  []buildSummary `json:"recentBuilds"`
	Failures      []buildSummary `json:"recentFailures"`
	Truncated     bool           `json:"truncated,omitempty"`
}

// usage tells what the store knows: microVMs by state, the memory that
// running ones commit (their image version's minimumMemoryInMiB), and
// recent builds; the operator's across every account, a tenant's its own.
func (c *Console) usage(w http.ResponseWriter, r *http.Request) {
	s, ok := c.session(w, r)
	if !ok {
		return
	}
	accts := []string{s.key.Account}
	if c.operator(s.key.Account) {
		var err error
		if accts, err = c.accounts(r.Context()); err != nil {
			writeErr(w, http.StatusInternalServerError, "InternalServerException", err.Error())
			return
		}
	}
	out := usageOut{ByState: map[string]int{}, HostMemoryMiB: c.cfg.HostMemoryMiB, Accounts: []accountUsage{}}
	var builds []buildSummary
	for _, a := range accts {
		u, bs, trunc, err := c.accountUsage(r.Context(), a)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, "InternalServerException", "reading usage: "+err.Error())
			return
		}
		out.Truncated = out.Truncated || trunc
		for st, n := range u.ByState {
			out.ByState[st] += n
		}
		out.MemoryMiB += u.MemoryMiB
		out.Accounts = append(out.Accounts, u)
		builds = append(builds, bs...)
	}
	slices.SortFunc(builds, func(a, b buildSummary) int { return b.CreatedAt.Compare(a.CreatedAt) })
	out.RecentBuilds = []buildSummary{}
	out.Failures = []buildSummary{}
	for _, b := range builds {
		if len(out.RecentBuilds) < recentBuilds {
			out.RecentBuilds = append(out.RecentBuilds, b)
		}
		if b.State == store.BuildFailed && len(out.Failures) < recentBuilds {
			out.Failures = append(out.Failures, b)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (c *Console) accountUsage(ctx context.Context, account string) (accountUsage, []buildSummary, bool, error) {
	u := accountUsage{Account: account, ByState: map[string]int{}}
	var builds []buildSummary
	truncated := false
	mem := map[string]int64{} // image:version → MiB
	memoryOf := func(image, version string) int64 {
		k := image + ":" + version
		if m, ok := mem[k]; ok {
			return m
		}
		var want int64 // the largest minimum, as the builder sizes the VM
		if v, err := c.cfg.Store.GetImageVersion(ctx, account, image, version); err == nil {
			for _, r := range v.Config.Resources {
				want = max(want, r.MinimumMemoryInMiB)
			}
		}
		m := memoryFor(want)
		mem[k] = m
		return m
	}
	p := store.Page{Limit: 100}
	for seen := 0; ; {
		ms, next, err := c.cfg.Store.ListMicrovms(ctx, account, store.MicrovmFilter{}, p)
		if err != nil {
			return u, nil, false, err
		}
		for _, m := range ms {
			u.ByState[string(m.State)]++
			// Suspended microVMs hold disk, not host memory.
			switch m.State {
			case store.StatePending, store.StateRunning, store.StateSuspending:
				if m.MemoryMiB > 0 { // what it was admitted with
					u.MemoryMiB += m.MemoryMiB
				} else {
					u.MemoryMiB += memoryOf(m.ImageName, m.ImageVersion)
				}
			}
		}
		seen += len(ms)
		if next == "" {
			break
		}
		if seen >= usageMaxMicrovms {
			truncated = true
			break
		}
		p.Token = next
	}
	p = store.Page{Limit: 100}
	for {
		imgs, next, err := c.cfg.Store.ListImages(ctx, account, "", p)
		if err != nil {
			return u, nil, false, err
		}
		for _, img := range imgs {
			u.Images++
			vs, _, err := c.cfg.Store.ListImageVersions(ctx, account, img.Name, store.Page{Limit: 50})
			if err != nil {
				return u, nil, false, err
			}
			for _, v := range vs {
				bs, _, err := c.cfg.Store.ListBuilds(ctx, account, img.Name, v.Version, store.Page{Limit: 10})
				if err != nil {
					return u, nil, false, err
				}
				for _, b := range bs {
					u.Builds++
					if b.State == store.BuildFailed {
						u.Failed++
					}
					builds = append(builds, buildSummary{Account: account, Image: img.Name, Version: v.Version, BuildID: b.ID,
						State: b.State, StateReason: b.StateReason, CreatedAt: b.CreatedAt})
				}
			}
		}
		if next == "" {
			break
		}
		if u.Images >= usageMaxImages {
			truncated = true
			break
		}
		p.Token = next
	}
	return u, builds, truncated, nil
}
