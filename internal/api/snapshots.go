package api

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// SnapshotMicrovmImage makes a new image of account, name, whose one
// version starts microVMs where the suspended microVM id is: its memory
// and disk, the configuration of the version it runs. It is an image like
// any other (quotas, listing, RunMicrovm, DeleteMicrovmImage frees its
// files); the microVM stays suspended. E2B's snapshots are these images.
func (s *Server) SnapshotMicrovmImage(ctx context.Context, account, id, name string) (store.Image, error) {
	sn, ok := s.be.(lifecycle.Snapshotter)
	if !ok {
		return store.Image{}, fmt.Errorf("this kiln server's backend cannot snapshot microvms: %w", errdefs.ErrUnavailable)
	}
	if !imageNameRE.MatchString(name) {
		return store.Image{}, fmt.Errorf("image name %q must match [a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}: %w", name, errdefs.ErrInvalid)
	}
	m, err := s.st.GetMicrovm(ctx, account, id)
	if err != nil {
		return store.Image{}, err
	}
	if m.State != store.StateSuspended {
		return store.Image{}, fmt.Errorf("microvm %s is %s: only a suspended microvm can be snapshotted: %w", id, m.State, errdefs.ErrConflict)
	}
	src, err := s.st.GetImageVersion(ctx, account, m.ImageName, m.ImageVersion)
	if err != nil {
		return store.Image{}, fmt.Errorf("the image version microvm %s runs (%s:%s): %w", id, m.ImageName, m.ImageVersion, err)
	}
	now := s.cfg.Now().UTC()
	arn := s.arn(account, kindImage, name)
	first := store.VersionName(1)
	img := store.Image{Account: account, Name: name, ARN: arn, State: store.ImageCreating, LatestVersion: first, CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: account, ImageName: name, ImageARN: arn, Version: first, State: store.VersionInProgress,
		Status: store.VersionActive, Config: src.Config, CreatedAt: now, UpdatedAt: now}
	adm, err := s.admission(ctx, account)
	if err != nil {
		return store.Image{}, err
	}
	// The record first, under the garbage collector's hold: files of a
	// version without a record are the collector's to remove.
	release := s.holdReferences()
	err = s.st.CreateImageWithinQuota(ctx, img, v, nil, nil, adm)
	release()
	if err != nil {
		return store.Image{}, err
	}
	undo := func(cause error) (store.Image, error) {
		bg := context.WithoutCancel(ctx)
		if err := s.st.DeleteImage(bg, account, name); err != nil {
			slog.Warn("removing the record of a failed snapshot", "image", name, "err", err)
		}
		if err := s.be.DeleteImageVersion(bg, account, name, first); err != nil {
			slog.Warn("freeing a failed snapshot", "image", name, "err", err)
		}
		return store.Image{}, cause
	}
	if err := sn.SnapshotMicrovm(ctx, m, name, first); err != nil {
		return undo(fmt.Errorf("snapshotting microvm %s: %w", id, err))
	}
	// The version's success makes the image CREATED with it as its latest
	// active version, in the same store transaction.
	v.State, v.UpdatedAt = store.VersionSuccessful, s.cfg.Now().UTC()
	if err := s.st.UpdateImageVersion(ctx, v); err != nil {
		return undo(fmt.Errorf("recording snapshot %s: %w", name, err))
	}
	img, err = s.st.GetImage(ctx, account, name)
	if err != nil {
		return undo(fmt.Errorf("recording snapshot %s: %w", name, err))
	}
	return img, nil
}
