//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/pkgproxy"
)

// newPackages is a package proxy on the host's apt mirrors, as `kiln
// server` makes it, caching under dir.
func newPackages(t testing.TB, dir string) *pkgproxy.Proxy {
	t.Helper()
	mirrors, err := pkgproxy.HostMirrors("", nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := pkgproxy.New(pkgproxy.Config{Mirrors: mirrors, Dir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// aptDockerfile installs a small package after a COPY; PROBE, if set, is
// an address whose port 443 the guest must not reach directly.
const aptDockerfile = `FROM debian:12
ARG PROBE
COPY stamp /stamp
RUN apt-get update && apt-get install -y --no-install-recommends hello && hello \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -n "$PROBE" ] && timeout 5 bash -c "exec 3<>/dev/tcp/$PROBE/443"; then echo "reached $PROBE:443 directly"; exit 1; fi
`

// TestPackageProxy: apt-get in build VMs works through the package proxy
// (the host's mirror answers at a documentation address that guests are
// denied); a second account's identical build hits nothing of the
// first's cache (it fetches every file again); the first account's
// rebuild after a change above the apt step fetches no file again (those
// two builds run side by side, after the first). The
// guest's own connection to the mirror's address on another port is
// dropped.
func TestPackageProxy(t *testing.T) {
	d := newDriver(t)
	dir := t.TempDir()
	pkgs := newPackages(t, filepath.Join(dir, "pkg-cache"))
	ib := &image.Builder{
		DataDir: filepath.Join(dir, "data"),
		Runner:  &Runner{Driver: d, MemoryMiB: 512, Packages: pkgs, Logger: testLogger()},
		Bases:   &base.Resolver{Managed: &base.Managed{DataDir: kilnDataDir()}, Logger: testLogger()},
		Logger:  testLogger(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	defer cancel()
	addrs, err := pkgs.Resolve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	probe := ""
	if (&egress.Policy{HostAddrs: noHostAddrs}).Check(addrs[0]) != nil {
		probe = addrs[0].String()
	} else {
		t.Logf("the mirror %s is not on the deny list: the direct-connection check is skipped", addrs[0])
	}
	// Each build has its own context folder: B's and A's rebuild run side
	// by side, both after A's first build (so A's cache is there for B to
	// miss and for A's rebuild to hit).
	build := func(account, stamp string) error {
		bctx := t.TempDir()
		os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(aptDockerfile), 0o644)
		os.WriteFile(filepath.Join(bctx, "stamp"), []byte(stamp), 0o644)
		var log bytes.Buffer
		start := time.Now()
		_, err := ib.Build(ctx, image.Request{Account: account, ContextDir: bctx, BuildArgs: map[string]string{"PROBE": probe},
			Output: filepath.Join(t.TempDir(), "root.ext4"), Log: &log})
		if err != nil {
			return fmt.Errorf("build for %s: %v\n%s", account, err, tailOf(log.Bytes()))
		}
		st := pkgs.Stats(image.ScopeName(account))
		t.Logf("%s (%s): %v; cache hits %d, mirror fetches %d, passed through %d, refused %d", account, stamp, time.Since(start).Round(time.Second),
			st.Hits.Load(), st.Fetches.Load(), st.Passed.Load(), st.Refused.Load())
		return nil
	}
	a, b := pkgs.Stats(image.ScopeName("acct-a")), pkgs.Stats(image.ScopeName("acct-b"))

	if err := build("acct-a", "1"); err != nil {
		t.Fatal(err)
	}
	fetched := a.Fetches.Load()
	if fetched < 2 || a.Hits.Load() != 0 {
		t.Fatalf("account A's first build: %d fetches, %d hits; want the package lists and hello fetched", fetched, a.Hits.Load())
	}
	errs := make([]error, 2)
	concurrently(2, func(i int) {
		if i == 0 {
			errs[i] = build("acct-b", "1")
		} else {
			errs[i] = build("acct-a", "2")
		}
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if b.Hits.Load() != 0 || b.Fetches.Load() != fetched {
		t.Errorf("account B: %d hits, %d fetches; want 0 hits and all %d files fetched again (A's cache is A's)", b.Hits.Load(), b.Fetches.Load(), fetched)
	}
	if a.Fetches.Load() != fetched || a.Hits.Load() < fetched {
		t.Errorf("account A's rebuild after a change above apt-get: %d fetches (want still %d), %d hits (want ≥ %d)", a.Fetches.Load(), fetched, a.Hits.Load(), fetched)
	}
	checkNoNetns(t)
}

func noHostAddrs() ([]netip.Addr, error) { return nil, nil }

func tailOf(b []byte) []byte {
	if len(b) > 4000 {
		return b[len(b)-4000:]
	}
	return b
}
