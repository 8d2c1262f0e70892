//go:build linux

package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTemplateFromSuspendedOwnsItsChain: a template made of a suspended
// clone names only its own files, so it outlives the template the clone
// came from (an E2B snapshot outlives the image it was taken of), and
// its clones start where the source was suspended.
func TestTemplateFromSuspendedOwnsItsChain(t *testing.T) {
	d := newDriver(t, shortDir(t))
	boot(t, d, "src")
	mustSh(t, d, "src", "mkdir -p /mem && mount -t tmpfs tmpfs /mem && echo base > /mem/v && sync")
	tmpl := snapshot(t, d, "src")
	clone(t, d, tmpl, "c1")
	mustSh(t, d, "c1", "echo c1 > /mem/v && echo c1 > /root/v && sync")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := d.Suspend(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(shortDir(t), "fork")
	if _, err := d.TemplateFromSuspended(ctx, "c1", dir); err != nil {
		t.Fatal(err)
	}
	chain, err := d.readChain(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range chain {
		if !strings.HasPrefix(l.Path, dir+string(filepath.Separator)) {
			t.Errorf("the template's chain names %s, outside %s", l.Path, dir)
		}
	}
	if len(chain) != 3 {
		t.Errorf("chain %+v: want its disk, the source template's layer and the root", chain)
	}
	// The source clone and its template go; the new template stands alone.
	if err := d.Terminate(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(tmpl); err != nil {
		t.Fatal(err)
	}
	clone(t, d, dir, "c2")
	if got := mustSh(t, d, "c2", "cat /mem/v /root/v; hostname"); got != "c1\nc1\nc2" {
		t.Errorf("the new template's clone sees %q, want c1's memory and disk and its own hostname", got)
	}
}
