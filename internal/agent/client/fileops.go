package client

import (
	"context"
	"fmt"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// FileOp changes the guest's file system as req.User (see
// proto.FileOpRequest). The guest's answer is checked before it is
// returned (proto.ValidateFileOp).
func (c *Client) FileOp(ctx context.Context, req proto.FileOpRequest) (proto.FileOpResult, error) {
	var res proto.FileOpResult
	if err := c.call(ctx, proto.TypeFileOp, req, &res, nil); err != nil {
		return proto.FileOpResult{}, err
	}
	if err := proto.ValidateFileOp(req, res); err != nil {
		return proto.FileOpResult{}, fmt.Errorf("%s: the agent's answer: %w", req.Op, err)
	}
	return res, nil
}

// Watch is a directory watch in the guest (proto.WatchOpen).
type Watch struct {
	c         *Client
	id        uint64
	recursive bool
}

// ID names the watch in the guest (unique for the guest's life).
func (w *Watch) ID() uint64 { return w.id }

// Watch starts watching dir (absolute) as user.
func (c *Client) Watch(ctx context.Context, dir string, recursive bool, user string) (*Watch, error) {
	var open proto.StreamResult
	if err := c.call(ctx, proto.TypeWatchOpen, proto.WatchOpen{Path: dir, Recursive: recursive, User: user}, &open, nil); err != nil {
		return nil, err
	}
	return &Watch{c: c, id: open.StreamID, recursive: recursive}, nil
}

// Read returns the events queued in the guest, waiting up to wait for the
// first (none when the wait ends). After an error (an overflow among
// them, see proto.WatchOverflow) the watch is gone in the guest. The
// guest's answer is checked (proto.ValidateWatchEvents).
func (w *Watch) Read(ctx context.Context, wait time.Duration) ([]proto.WatchEvent, error) {
	var res proto.WatchEvents
	// The guest waits at most its bound; the call's own deadline is ctx's.
	if err := w.c.call(ctx, proto.TypeWatchRead, proto.WatchRead{StreamID: w.id, WaitMillis: wait.Milliseconds()}, &res, nil); err != nil {
		return nil, err
	}
	if err := proto.ValidateWatchEvents(w.recursive, res); err != nil {
		return nil, fmt.Errorf("watch: the agent's answer: %w", err)
	}
	return res.Events, nil
}

// Close ends the watch in the guest, best effort.
func (w *Watch) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = w.c.call(ctx, proto.TypeWatchClose, proto.StreamClose{StreamID: w.id}, nil, nil)
}

// ReattachWatch names an existing guest watch by its id, for callers that
// keep watches across requests (E2B's CreateWatcher).
func (c *Client) ReattachWatch(id uint64, recursive bool) *Watch {
	return &Watch{c: c, id: id, recursive: recursive}
}
