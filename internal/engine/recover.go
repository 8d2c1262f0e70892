//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/guestvm"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// VMPrefix starts every microVM id (and so every VM and namespace the
// engine owns); recovery leaves other ids (build VMs) to their owners.
const VMPrefix = "mvm-"

// Recover implements lifecycle.Recoverer. It adopts what the driver still runs
// (Driver.Recover), then brings every unfinished record to a final or
// stable state: a transition in flight is finished (or redone: every step
// is idempotent), a VM the engine lost is TERMINATED with the reason, and
// VM networks and VMs that no record claims are removed. Builds in flight
// are run again from the start.
func (e *Engine) Recover(ctx context.Context, vms []store.Microvm, builds []store.Build) error {
	e.meterRecovered(ctx, true)
	defer e.meterRecovered(ctx, false)
	rep, err := e.cfg.Driver.Recover(ctx)
	if err != nil {
		return fmt.Errorf("recovering vms: %w", err)
	}
	e.log.Info("engine recovery", "adopted", len(rep.Adopted), "suspended", len(rep.Suspended), "removed", len(rep.Removed), "records", len(vms))
	infos, err := e.cfg.Driver.List(ctx)
	if err != nil {
		return fmt.Errorf("listing vms: %w", err)
	}
	driverState := map[string]vmm.State{}
	for _, i := range infos {
		driverState[i.ID] = i.State
	}
	live := map[string]bool{}
	var errs []error
	for _, m := range vms {
		if m.State == store.StateTerminated {
			continue
		}
		live[m.ID] = true
		errs = append(errs, e.recoverOne(ctx, m, driverState[m.ID]))
	}
	// VMs of microVMs no longer live in the store go, and so do build VMs
	// the previous process left (their builds start over below). Only
	// networks this data directory created are judged: other namespaces on
	// the host, other kiln servers' among them, are not ours; and on a
	// shared driver, likewise only VMs this data directory made (ownsVM).
	for _, i := range infos {
		if !live[i.ID] && e.ownsVM(i.ID) {
			e.log.Info("removing vm with no live record", "vm", i.ID)
			errs = append(errs, e.cfg.Driver.Terminate(ctx, i.ID))
		}
	}
	removed, err := netns.Reconcile(ctx, func(id string) bool {
		return live[id] || !strings.HasPrefix(id, VMPrefix) || !e.ownsNet(id)
	})
	for _, id := range removed {
		e.markNet(id, false)
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("reconciling vm networks: %w", err))
	}
	errs = append(errs, e.recoverBuilds(ctx, builds))
	return errors.Join(errs...)
}

func (e *Engine) recoverOne(ctx context.Context, m store.Microvm, ds vmm.State) error {
	if ds == vmm.StateRunning || m.State == store.StatePending || m.PendingOp == "resume" {
		// What ran before the restart runs on, whatever the limit says.
		e.forceReserve(m.ID, memoryOf(m))
	}
	v := e.state(m)
	v.mu.Lock()
	v.lastActive = m.UpdatedAt // the idle timer goes on from the store
	v.running = m.State == store.StateRunning
	v.mu.Unlock()
	lost := func(what string) error {
		e.lose(v, "VMLost: "+what+" after a restart of kiln server")
		return nil
	}
	// The network of a VM that still exists is found again; one that is
	// missing is made anew (its VM, if any, is then unreachable: lost).
	g, err := guestvm.Open(ctx, e.guestConfig(v))
	if err == nil {
		g.AdoptVM()
		v.mu.Lock()
		v.g = g
		v.mu.Unlock()
	}
	switch m.State {
	case store.StateTerminating:
		return e.TerminateMicrovm(ctx, m)
	case store.StatePending:
		if ds == vmm.StateRunning && g != nil {
			if err := e.ensureNet(ctx, v, ""); err != nil {
				return lost(err.Error())
			}
			_, err := e.report(ctx, v, []store.MicrovmState{store.StatePending}, store.StateRunning, "")
			return err
		}
		e.cfg.Driver.Terminate(ctx, m.ID)
		return e.StartMicrovm(ctx, m)
	}
	if g == nil {
		if !(ds == vmm.StateSuspended && (m.State == store.StateSuspended || m.State == store.StateSuspending)) {
			return lost("the microVM's network was gone")
		}
		// A suspended VM whose network is gone (a host reboot removes
		// every namespace, link and nftables table) gets a new one: the
		// guest's side of it (address, MAC, gateway) is the same for
		// every VM, so the saved guest resumes into it unchanged. The
		// driver kept the VM only if its memory reached the disk.
		e.log.Info("recreating the network of a suspended microvm (host rebooted?)", "microvm", m.ID)
	}
	if err := e.ensureNet(ctx, v, ""); err != nil {
		return lost(err.Error())
	}
	switch m.State {
	case store.StateRunning:
		if ds != vmm.StateRunning {
			return lost("the VM process was gone")
		}
		e.pumpLogs(ctx, m.ID)
	case store.StateSuspending:
		switch ds {
		case vmm.StateRunning:
			return e.SuspendMicrovm(ctx, m)
		case vmm.StateSuspended:
			_, err := e.report(ctx, v, []store.MicrovmState{store.StateSuspending}, store.StateSuspended, m.StateReason)
			return err
		default:
			return lost("the VM was gone while suspending")
		}
	case store.StateSuspended:
		switch ds {
		case vmm.StateSuspended:
			if m.PendingOp == "resume" {
				return e.ResumeMicrovm(ctx, m)
			}
		case vmm.StateRunning:
			// The resume finished but was not recorded.
			_, err := e.report(ctx, v, []store.MicrovmState{store.StateSuspended}, store.StateRunning, "")
			return err
		default:
			return lost("the suspended VM's files were gone")
		}
	}
	return nil
}
