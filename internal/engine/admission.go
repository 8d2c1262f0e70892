//go:build linux

package engine

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

var _ lifecycle.HostAdmitter = (*Engine)(nil)

// Host admission: the engine keeps a reservation of guest memory for every
// VM it runs (microVMs RUNNING, starting or resuming; builds while they
// run) and refuses a start, resume or build that would take the total past
// MemoryOvercommit × physical memory. Suspended microVMs hold none: their
// memory is on disk. Without this, a host that promised more memory than
// it has lets the kernel's OOM killer pick a QEMU process (some tenant's
// VM) when the guests touch their memory.

// hostMemoryMiB reads MemTotal from /proc/meminfo.
func hostMemoryMiB() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("reading host memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("reading host memory: MemTotal %q: %w", rest, err)
			}
			return kb >> 10, nil
		}
	}
	return 0, fmt.Errorf("reading host memory: no MemTotal in /proc/meminfo: %w", errdefs.ErrUnavailable)
}

// memoryOf is the guest memory a microVM commits.
func memoryOf(m store.Microvm) int64 {
	if m.MemoryMiB > 0 {
		return m.MemoryMiB
	}
	return lifecycle.DefaultMicrovmMemoryMiB
}

// allowedMiB is the guest memory the host may commit (0: no limit).
func (e *Engine) allowedMiB() int64 {
	if e.cfg.MemoryOvercommit <= 0 {
		return 0
	}
	return int64(float64(e.cfg.HostMemoryMiB) * e.cfg.MemoryOvercommit)
}

func (e *Engine) admitLocked(key string, mem int64) error {
	if _, ok := e.committed[key]; ok {
		return nil
	}
	allowed := e.allowedMiB()
	if allowed == 0 || e.committedMiB+mem <= allowed {
		return nil
	}
	return fmt.Errorf("this host has no room for %d MiB more of guest memory: %d MiB committed to running microVMs and builds, %d MiB requested, %d MiB allowed (%.2f × %d MiB physical, --memory-overcommit); retry when other microVMs suspend or end: %w",
		mem, e.committedMiB, mem, allowed, e.cfg.MemoryOvercommit, e.cfg.HostMemoryMiB, errdefs.ErrExhausted)
}

// AdmitMemory implements lifecycle.HostAdmitter: whether mem MiB fit now,
// without reserving them.
func (e *Engine) AdmitMemory(_ context.Context, mem int64) error {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	return e.admitLocked("", mem)
}

// reserve commits mem MiB for key (a VM id, or "build/ID"), or refuses
// with errdefs.ErrExhausted. Reserving a key that holds a reservation
// already is a no-op.
func (e *Engine) reserve(key string, mem int64) error {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	if err := e.admitLocked(key, mem); err != nil {
		e.log.Warn("host admission refused", "vm", key, "requested_mib", mem, "committed_mib", e.committedMiB, "allowed_mib", e.allowedMiB())
		metrics.QuotaRefusals.WithLabelValues("HostMemory").Inc()
		return err
	}
	e.addLocked(key, mem)
	return nil
}

// forceReserve records a VM that runs whatever the limit says (one found
// running after a restart).
func (e *Engine) forceReserve(key string, mem int64) {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	e.addLocked(key, mem)
}

func (e *Engine) addLocked(key string, mem int64) {
	if _, ok := e.committed[key]; ok {
		return
	}
	e.committed[key] = mem
	e.committedMiB += mem
}

// release gives key's reservation back; releasing none is a no-op.
func (e *Engine) release(key string) {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	if mem, ok := e.committed[key]; ok {
		delete(e.committed, key)
		e.committedMiB -= mem
	}
}

// CommittedMiB returns the guest memory reserved now and the limit (0: none).
func (e *Engine) CommittedMiB() (committed, allowed int64) {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	return e.committedMiB, e.allowedMiB()
}
