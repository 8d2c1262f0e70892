//go:build linux

package qemu

import (
	"context"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestBootRetriesAHungBoot: a boot whose guest never gets to its agent
// (here the first QEMU is stopped over QMP as soon as it is up, as a
// translated boot sometimes hangs by itself) is booted once more after
// half the boot timeout, and the VM comes up in the second process; the
// first is gone.
func TestBootRetriesAHungBoot(t *testing.T) {
	d := newDriver(t, shortDir(t))
	d.cfg.BootTimeout = 50 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	booted := make(chan error, 1)
	go func() {
		_, err := d.Boot(ctx, vmm.BootSpec{ID: "hung", RootDisk: env.RootDisk, MemoryMiB: 256})
		booted <- err
	}()
	var first *proc
	for end := time.Now().Add(30 * time.Second); first == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the first QEMU never answered on QMP")
		}
		v, err := d.get("hung")
		if err != nil {
			continue
		}
		v.mu.Lock()
		q, p, a := v.qmp, v.proc, v.agent
		v.mu.Unlock()
		if q == nil {
			continue
		}
		if a != nil {
			t.Fatal("the guest answered before it could be stopped")
		}
		if err := q.Execute(ctx, "stop", nil, nil); err != nil {
			t.Fatal(err)
		}
		first = p
	}
	start := time.Now()
	if err := <-booted; err != nil {
		t.Fatalf("boot after a hung first try: %v", err)
	}
	t.Logf("booted %v after the first QEMU was stopped", time.Since(start).Round(time.Millisecond))
	if first.alive() {
		t.Error("the hung QEMU still runs")
	}
	v, _ := d.get("hung")
	v.mu.Lock()
	second := v.proc
	v.mu.Unlock()
	if second == first || !second.alive() {
		t.Error("the VM does not run in a second QEMU")
	}
	if out := mustSh(t, d, "hung", "echo up"); out != "up" {
		t.Errorf("the guest answered %q", out)
	}
}
