//go:build linux

package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

var _ lifecycle.LogSource = (*Engine)(nil)

// loggingDisabled reports whether a microVM's output must not be kept: its
// own `logging` says {"disabled": {}}, or it says nothing and its image
// version's does.
func (e *Engine) loggingDisabled(ctx context.Context, m store.Microvm) bool {
	raw := m.Logging
	if len(raw) == 0 || string(raw) == "null" {
		raw = m.VersionLogging
	}
	if (len(raw) == 0 || string(raw) == "null") && m.Hooks == nil {
		// A record older than the copy RunMicrovm makes.
		_, vl, err := e.cfg.Control.LegacyVersionSettings(ctx, m.Account, m.ImageName, m.ImageVersion)
		if err != nil {
			return false
		}
		raw = vl
	}
	return disabled(raw)
}

func disabled(raw json.RawMessage) bool {
	var l struct {
		Disabled *struct{} `json:"disabled"`
	}
	return len(raw) > 0 && json.Unmarshal(raw, &l) == nil && l.Disabled != nil
}

// openLog opens the on-disk log of a microVM the engine takes on (start or
// recovery), or removes any, if its logging is disabled. The guest console
// reaches the log through applog.Manager.Console, which finds it open.
func (e *Engine) openLog(ctx context.Context, m store.Microvm) {
	if e.loggingDisabled(ctx, m) {
		e.cfg.Logs.Remove(m.ID)
		return
	}
	if _, err := e.cfg.Logs.Open(m.ID); err != nil {
		e.log.Warn("opening the microvm log: its output is not kept", "microvm", m.ID, "err", err)
	}
}

// pumpLogs copies the app's output from the VM's current agent connection
// into its log until that connection ends (suspend, death, terminate);
// every start, resume and adoption starts a new pump. The log's writer
// never blocks, so a flooding guest cannot hold up the agent connection.
func (e *Engine) pumpLogs(ctx context.Context, id string) {
	a, err := e.cfg.Driver.Agent(ctx, id)
	if err != nil {
		return
	}
	go func() {
		for r := range a.Logs() {
			w := e.cfg.Logs.Writer(id)
			if w == nil {
				continue // logging disabled: drain and keep nothing
			}
			if r.ExitCode != nil {
				fmt.Fprintf(w, "[kiln] the app exited with status %d\n", *r.ExitCode)
				continue
			}
			w.Write(r.Data)
			if r.Dropped > 0 {
				fmt.Fprintf(w, "[kiln] %d bytes of app output dropped by the guest\n", r.Dropped)
			}
		}
	}()
}

// MicrovmLog implements lifecycle.LogSource: the app's stdout and stderr and the
// guest console, from the log files, whether the VM runs, ended, or kiln
// restarted since.
func (e *Engine) MicrovmLog(ctx context.Context, m store.Microvm, offset int64, limit int) ([]byte, int64, error) {
	return e.cfg.Logs.Read(m.ID, offset, limit)
}

// sweepLogs removes the logs of ended microVMs past their retention, at
// start and then every interval.
func (e *Engine) sweepLogs(ctx context.Context, every time.Duration) {
	for {
		if gone, err := e.cfg.Logs.Sweep(e.now()); err != nil {
			e.log.Warn("sweeping expired microvm logs", "err", err)
		} else if len(gone) > 0 {
			e.log.Info("removed expired microvm logs", "count", len(gone))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}
