package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Cordoner is the part of the store the watcher writes
// (store.Cluster.SetNodeCordoned).
type Cordoner interface {
	SetNodeCordoned(ctx context.Context, name string, cordoned bool) error
}

// CordonWatcher mirrors spec.unschedulable of one Kubernetes Node into the
// store's cordon of one kiln node. Placement already skips cordoned
// nodes; microVMs running there keep running.
//
// The Node is the source of truth while it is watched: its value is
// written at start and again whenever it changes. A `kiln cluster cordon`
// on such a node lasts until the next change of the Node.
type CordonWatcher struct {
	Client *Client
	// KubeNode is the Kubernetes Node's name; KilnNode the kiln node's
	// (the store's). The DaemonSet gives both spec.nodeName.
	KubeNode, KilnNode string
	Store              Cordoner
	Log                *slog.Logger
	// WatchTimeout is how long one watch request lasts before the API
	// server ends it and the watcher starts another (default 5 minutes).
	WatchTimeout time.Duration
	// Retry is the pause after an error (default 5 s).
	Retry time.Duration

	// applied: the store holds cordoned, as written by this watcher.
	applied, cordoned bool
}

// Run watches until ctx ends.
func (w *CordonWatcher) Run(ctx context.Context) {
	if w.WatchTimeout <= 0 {
		w.WatchTimeout = 5 * time.Minute
	}
	if w.Retry <= 0 {
		w.Retry = 5 * time.Second
	}
	if w.Log == nil {
		w.Log = slog.Default()
	}
	for ctx.Err() == nil {
		err := w.once(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil && !errors.Is(err, ErrExpired) {
			w.Log.Warn("cordon watcher: retrying", "kube_node", w.KubeNode, "err", err, "in", w.Retry)
			select {
			case <-ctx.Done():
				return
			case <-time.After(w.Retry):
			}
		}
	}
}

// once reads the Node and watches it until the watch ends or a store
// write fails (Run pauses, then reads the Node afresh).
func (w *CordonWatcher) once(ctx context.Context) error {
	n, err := w.Client.GetNode(ctx, w.KubeNode)
	if err != nil {
		return err
	}
	if err := w.observe(ctx, n); err != nil {
		return err
	}
	rv := n.ResourceVersion
	for {
		err := w.Client.WatchNode(ctx, w.KubeNode, rv, w.WatchTimeout, func(n *corev1.Node) error {
			rv = n.ResourceVersion
			if n.Name == "" { // a BOOKMARK
				return nil
			}
			return w.observe(ctx, n)
		})
		if err != nil {
			return err
		}
	}
}

// observe writes the Node's cordon to the store when it differs from what
// the watcher last wrote.
func (w *CordonWatcher) observe(ctx context.Context, n *corev1.Node) error {
	want := n.Spec.Unschedulable
	if w.applied && want == w.cordoned {
		return nil
	}
	if err := w.Store.SetNodeCordoned(ctx, w.KilnNode, want); err != nil {
		// Not registered yet (the node registers as it starts) or the
		// store is down: written at the next try.
		w.applied = false
		return fmt.Errorf("recording cordoned=%v of node %s in the store: %w", want, w.KilnNode, err)
	}
	w.applied, w.cordoned = true, want
	w.Log.Info("cordon watcher: kubernetes node cordon recorded", "node", w.KilnNode, "kube_node", w.KubeNode, "cordoned", want)
	return nil
}
