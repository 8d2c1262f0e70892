//go:build linux

package qemu

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/kiln-sandbox/kiln/internal/qmp"
)

type capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// setIgnoreShared makes migration skip RAM blocks backed by a named file:
// only device state goes into the stream, the memory stays in its file.
// Both sides must agree on it.
func setIgnoreShared(ctx context.Context, q *qmp.Conn) error {
	return q.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []capability{{Capability: "x-ignore-shared", State: true}},
	}, nil)
}

// saveDeviceState writes the paused VM's device state to path; its
// memory, a shared file, stays where it is. kiln opens the file and hands
// QEMU the descriptor: QEMU, running unprivileged, has no access to path.
func saveDeviceState(ctx context.Context, q *qmp.Conn, path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	set, err := q.AddFD(ctx, f)
	if err != nil {
		return err
	}
	defer removeFDSet(q, set)
	if err := startMigration(ctx, q, fmt.Sprintf("file:/dev/fdset/%d", set)); err != nil {
		return err
	}
	return waitMigration(ctx, q)
}

// removeFDSet drops a descriptor set once QEMU is done with it; bounded,
// as it runs whatever state QEMU is in.
func removeFDSet(q *qmp.Conn, set int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q.RemoveFDSet(ctx, set)
}

// startMigration starts saving to uri with x-ignore-shared on.
func startMigration(ctx context.Context, q *qmp.Conn, uri string) error {
	if err := setIgnoreShared(ctx, q); err != nil {
		return err
	}
	// QEMU caps migration at 128 MiB/s by default; lift the cap so a
	// stream never waits on it.
	if err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	return q.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// loadDeviceState loads device state into a QEMU started with -incoming
// defer, from a descriptor kiln opened (see saveDeviceState).
func loadDeviceState(ctx context.Context, q *qmp.Conn, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := setIgnoreShared(ctx, q); err != nil {
		return err
	}
	set, err := q.AddFD(ctx, f)
	if err != nil {
		return err
	}
	defer removeFDSet(q, set)
	if err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": fmt.Sprintf("file:/dev/fdset/%d", set)}, nil); err != nil {
		return err
	}
	return waitMigration(ctx, q)
}

// waitMigration polls until the migration completes or fails. Polling is
// cheap (a QMP round trip is tens of microseconds) and needs no event
// capability on either side.
func waitMigration(ctx context.Context, q *qmp.Conn) error {
	delay := 200 * time.Microsecond
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := q.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for migration (status %q): %w", st.Status, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Millisecond)
	}
}
