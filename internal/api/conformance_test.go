package api_test

import (
	"context"
	"fmt"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/store"
)

func hostArch() string {
	return map[string]string{"amd64": "X86_64", "arm64": "ARM_64"}[runtime.GOARCH]
}

// TestListBuildsFiltersBeforePaging: a filtered page is full whenever a
// nextToken follows it (old code paged first and filtered the page, so
// pages came back short or empty with a nextToken).
func TestListBuildsFiltersBeforePaging(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now().UTC()
	arn := "arn:aws:lambda:us-east-1:111111111111:microvm-image:mixed"
	img := store.Image{Account: "111111111111", Name: "mixed", ARN: arn, State: store.ImageCreated, LatestVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: "111111111111", ImageName: "mixed", ImageARN: arn, Version: "1", State: "SUCCESSFUL", Status: "ACTIVE", CreatedAt: now, UpdatedAt: now}
	// Builds recorded for several architectures (as a store written by an
	// older kiln, or another host, may hold): X at positions 3 and 6.
	archs := []string{"ARM_64", "ARM_64", "X86_64", "ARM_64", "ARM_64", "X86_64", "ARM_64"}
	var bs []store.Build
	for i, a := range archs {
		bs = append(bs, store.Build{Account: "111111111111", ImageName: "mixed", ImageARN: arn, Version: "1",
			ID: "b" + string(rune('a'+i)), State: store.BuildSuccessful, Architecture: a, Chipset: "GENERIC", ChipsetGeneration: "1",
			CreatedAt: now.Add(time.Duration(i) * time.Second), UpdatedAt: now})
	}
	if err := e.st.CreateImage(ctx, img, v, bs, nil); err != nil {
		t.Fatal(err)
	}
	var got []string
	tok := ""
	for pages := 0; ; pages++ {
		if pages > 10 {
			t.Fatal("paging does not end")
		}
		q := url.Values{"maxResults": {"1"}, "architecture": {"X86_64"}}
		if tok != "" {
			q.Set("nextToken", tok)
		}
		l := e.ok("GET", base+"/microvm-images/mixed/versions/1/builds", q, nil)
		items := l["items"].([]any)
		next, _ := l["nextToken"].(string)
		if next != "" && len(items) != 1 {
			t.Fatalf("page %d has %d items and a nextToken: filtered after paging", pages, len(items))
		}
		for _, it := range items {
			got = append(got, it.(map[string]any)["buildId"].(string))
		}
		if next == "" {
			break
		}
		tok = next
	}
	if strings.Join(got, ",") != "bc,bf" {
		t.Fatalf("X86_64 builds: %v, want [bc bf]", got)
	}
}

// TestListMicrovmsMalformedImage: a malformed image identifier is a
// ValidationException (old code answered an empty list); another
// account's image still lists nothing.
func TestListMicrovmsMalformedImage(t *testing.T) {
	e := newEnv(t)
	_, err := do(t, e.c, "GET", base+"/microvms", url.Values{"imageIdentifier": {"arn:aws:lambda:nonsense"}}, nil)
	fails(t, err, "ValidationException", "imageIdentifier")
	_, err = do(t, e.c, "GET", base+"/microvms", url.Values{"imageIdentifier": {"has space"}}, nil)
	fails(t, err, "ValidationException", "regular expression pattern")
	l := e.ok("GET", base+"/microvms", url.Values{"imageIdentifier": {"arn:aws:lambda:us-east-1:222222222222:microvm-image:theirs"}}, nil)
	if len(l["items"].([]any)) != 0 {
		t.Fatalf("another account's image lists %v", l["items"])
	}
}

// TestOtherArchitectureRefused: cpuConfigurations naming an architecture
// other than the host's is refused, naming what this server builds (old
// code accepted it and built for the host).
func TestOtherArchitectureRefused(t *testing.T) {
	e := newEnv(t)
	other := "ARM_64"
	if hostArch() == "ARM_64" {
		other = "X86_64"
	}
	b := imageBody("cross")
	b["cpuConfigurations"] = []any{map[string]any{"architecture": other}}
	_, err := do(t, e.c, "POST", base+"/microvm-images", nil, b)
	fails(t, err, "ValidationException", "builds and runs only "+hostArch())
	b["cpuConfigurations"] = []any{map[string]any{"architecture": hostArch()}}
	e.ok("POST", base+"/microvm-images", nil, b)
	// UpdateMicrovmImage too.
	b = imageBody("")
	delete(b, "name")
	delete(b, "tags")
	b["cpuConfigurations"] = []any{map[string]any{"architecture": other}}
	_, err = do(t, e.c, "PUT", base+"/microvm-images/cross", nil, b)
	fails(t, err, "ValidationException", "builds and runs only")
}

// TestResourceSizes: only AWS's memory baselines are accepted, with AWS's
// constraint message (old code accepted 128..32768 and rounded up).
func TestResourceSizes(t *testing.T) {
	// Five builds at once: more than the default concurrent-build quota.
	e := newEnv(t, func(c *api.Config) {
		c.Quota = store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: -1}
	})
	for _, m := range api.MemorySizesMiB {
		b := imageBody(fmt.Sprintf("size-%d", m))
		b["resources"] = []any{map[string]any{"minimumMemoryInMiB": m}}
		e.ok("POST", base+"/microvm-images", nil, b)
	}
	for _, m := range []int{128, 1000, 3000, 16384, 32768} {
		b := imageBody("badsize")
		b["resources"] = []any{map[string]any{"minimumMemoryInMiB": m}}
		_, err := do(t, e.c, "POST", base+"/microvm-images", nil, b)
		fails(t, err, "ValidationException", "at 'resources.1.minimumMemoryInMiB' failed to satisfy constraint: Member must satisfy enum value set: [512, 1024, 2048, 4096, 8192]")
	}
}

// TestVCPUsFor: the vCPUs each size implies (AWS: 0.25 vCPU per 512 MiB,
// rounded up to whole vCPUs).
func TestVCPUsFor(t *testing.T) {
	want := map[int64]int{512: 1, 1024: 1, 2048: 1, 4096: 2, 8192: 4}
	for m, v := range want {
		if got := api.VCPUsFor(m); got != v {
			t.Errorf("VCPUsFor(%d) = %d, want %d", m, got, v)
		}
	}
}

// TestVersionNames: versions are named as AWS names them ("1.0", "2.0"),
// and a version recorded by an older kiln as "1" is found under "1.0" too,
// as a new one is under "1".
func TestVersionNames(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	now := time.Now().UTC()
	arn := "arn:aws:lambda:us-east-1:111111111111:microvm-image:old"
	img := store.Image{Account: "111111111111", Name: "old", ARN: arn, State: store.ImageCreated, LatestVersion: "1", LatestActiveVersion: "1", CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: "111111111111", ImageName: "old", ImageARN: arn, Version: "1", State: "SUCCESSFUL", Status: "ACTIVE", CreatedAt: now, UpdatedAt: now}
	if err := e.st.CreateImage(ctx, img, v, nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"1", "1.0"} {
		if got := e.ok("GET", base+"/microvm-images/old/versions/"+name, nil, nil); got["imageVersion"] != "1" {
			t.Errorf("old version asked as %q: imageVersion %v", name, got["imageVersion"])
		}
	}
	if _, err := do(t, e.c, "GET", base+"/microvm-images/old/versions/1.1", nil, nil); err == nil {
		t.Error("version 1.1 of old found: only N and N.0 name the same version")
	}
	for i, want := range map[int64]string{1: "1.0", 2: "2.0", 10: "10.0"} {
		if got := store.VersionName(i); got != want {
			t.Errorf("VersionName(%d) = %q, want %q", i, got, want)
		}
	}
}
