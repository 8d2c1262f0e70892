// Package fakebackend is an in-process lifecycle.Backend that runs no VMs: it
// moves records through their states after a short delay, as the real
// engine would, so that the API, the CLI, the SDK test and the benchmark
// can run without QEMU. It is a fake of kiln's own interface, for tests.
package fakebackend

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Backend is the fake. The zero value is not usable; use New.
type Backend struct {
	rep   *lifecycle.Reporter
	Delay time.Duration // before each reported transition

	mu    sync.Mutex
	calls []string
	logs  map[string][]byte // per microVM: one line per call
	wg    sync.WaitGroup
}

var (
	_ lifecycle.Backend   = (*Backend)(nil)
	_ lifecycle.LogSource = (*Backend)(nil)
)

// MicrovmLog implements lifecycle.LogSource with a line per call received.
func (b *Backend) MicrovmLog(_ context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l := b.logs[m.ID]
	if offset > int64(len(l)) {
		offset = int64(len(l))
	}
	end := min(int64(len(l)), offset+int64(limit))
	return append([]byte(nil), l[offset:end]...), end, nil
}

// New returns a fake reporting through rep after delay.
func New(rep *lifecycle.Reporter, delay time.Duration) *Backend {
	return &Backend{rep: rep, Delay: delay}
}

// Calls returns the calls received so far, as "Op id".
func (b *Backend) Calls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.calls...)
}

// Wait waits for every transition in flight.
func (b *Backend) Wait() { b.wg.Wait() }

func (b *Backend) later(op, id string, fn func(ctx context.Context) error) {
	b.mu.Lock()
	b.calls = append(b.calls, op+" "+id)
	if b.logs == nil {
		b.logs = map[string][]byte{}
	}
	b.logs[id] = append(b.logs[id], fmt.Sprintf("%s %s\n", time.Now().UTC().Format(time.RFC3339Nano), op)...)
	b.mu.Unlock()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		time.Sleep(b.Delay)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := fn(ctx); err != nil {
			slog.Debug("fake backend transition not applied", "op", op, "id", id, "err", err)
		}
	}()
}

func (b *Backend) move(m store.Microvm, from store.MicrovmState, to store.MicrovmState, reason string) func(context.Context) error {
	return func(ctx context.Context) error {
		_, err := b.rep.MicrovmState(ctx, m.Account, m.ID, []store.MicrovmState{from}, to, reason)
		return err
	}
}

func (b *Backend) StartMicrovm(_ context.Context, m store.Microvm) error {
	b.later("StartMicrovm", m.ID, b.move(m, store.StatePending, store.StateRunning, ""))
	return nil
}

func (b *Backend) SuspendMicrovm(_ context.Context, m store.Microvm) error {
	b.later("SuspendMicrovm", m.ID, b.move(m, store.StateSuspending, store.StateSuspended, m.StateReason))
	return nil
}

func (b *Backend) ResumeMicrovm(_ context.Context, m store.Microvm) error {
	b.later("ResumeMicrovm", m.ID, b.move(m, store.StateSuspended, store.StateRunning, ""))
	return nil
}

func (b *Backend) TerminateMicrovm(_ context.Context, m store.Microvm) error {
	b.later("TerminateMicrovm", m.ID, b.move(m, store.StateTerminating, store.StateTerminated, m.StateReason))
	return nil
}

// BuildImage succeeds unless the code artifact's URI contains "fail". Its
// snapshot has the largest memory the version's resources ask for (64 MiB
// if they ask none) and a 256 MiB disk.
func (b *Backend) BuildImage(_ context.Context, v store.ImageVersion, builds []store.Build) error {
	for _, bd := range builds {
		bd := bd
		b.later("BuildImage", bd.ID, func(ctx context.Context) error {
			if err := b.rep.BuildRunning(ctx, bd); err != nil {
				return err
			}
			b.rep.AppendBuildLog(ctx, bd.ID, []byte(fmt.Sprintf("fake build of %s version %s\n", v.ImageName, v.Version)))
			if v.Config.CodeArtifact != nil && strings.Contains(v.Config.CodeArtifact.URI, "fail") {
				return b.rep.BuildFinished(ctx, bd, false, "fake build failed on request", nil)
			}
			mem, disk := int64(64<<20), int64(256<<20)
			for _, r := range v.Config.Resources {
				mem = max(mem, r.MinimumMemoryInMiB<<20)
			}
			return b.rep.BuildFinished(ctx, bd, true, "", &store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem, DiskSnapshotSizeInBytes: &disk})
		})
	}
	return nil
}

func (b *Backend) DeleteImageVersion(_ context.Context, account, image, version string) error {
	b.mu.Lock()
	b.calls = append(b.calls, "DeleteImageVersion "+image+":"+version)
	b.mu.Unlock()
	return nil
}
