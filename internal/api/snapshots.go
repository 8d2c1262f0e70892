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
	srcBuilds, err := s.versionBuilds(ctx, src)
	if err != nil {
		return store.Image{}, err
	}
	srcBuild := s.successfulBuild(srcBuilds)
	mem := m.MemoryMiB
	if mem <= 0 {
		mem, _ = s.sizeOf(src, srcBuilds)
	}
	now := s.cfg.Now().UTC()
	arn := s.arn(account, kindImage, name)
	first := store.VersionName(1)
	img := store.Image{Account: account, Name: name, ARN: arn, State: store.ImageCreating, LatestVersion: first, CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: account, ImageName: name, ImageARN: arn, Version: first, State: store.VersionInProgress,
		Status: store.VersionActive, Config: src.Config, Platform: src.Platform, CreatedAt: now, UpdatedAt: now}
	// The version's one build records what the snapshot holds, as a
	// built version's builds do: the storage quota adds it up, and
	// microvmSize takes its memory for the version's microVMs. It is
	// SUCCESSFUL from the start so that its memory, which the copy will
	// write, is reserved against the quota in the transaction that admits
	// it (a build queued or running would also count as a concurrent
	// build, and a restart would try to redo it); the copy's disk is
	// added when it is known.
	memBytes := mem << 20
	b := store.Build{Account: account, ImageName: name, ImageARN: arn, Version: first, ID: newBuildID(), State: store.BuildSuccessful,
		Architecture: srcBuild.Architecture, Chipset: srcBuild.Chipset, ChipsetGeneration: srcBuild.ChipsetGeneration,
		CreatedAt: now, UpdatedAt: now, Snapshot: &store.SnapshotBuild{MemorySnapshotSizeInBytes: &memBytes}}
	adm, err := s.admission(ctx, account)
	if err != nil {
		return store.Image{}, err
	}
	// The record first, under the garbage collector's hold: files of a
	// version without a record are the collector's to remove.
	release := s.holdReferences()
	err = s.st.CreateImageWithinQuota(ctx, img, v, []store.Build{b}, nil, adm)
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
	sizes, err := sn.SnapshotMicrovm(ctx, m, name, first)
	if err != nil {
		return undo(fmt.Errorf("snapshotting microvm %s: %w", id, err))
	}
	if p := sizes.MemorySnapshotSizeInBytes; p != nil && *p > 0 {
		memBytes = *p
	}
	if p := sizes.DiskSnapshotSizeInBytes; p != nil && *p > 0 {
		disk := *p
		b.Snapshot.DiskSnapshotSizeInBytes = &disk
	}
	b.UpdatedAt = s.cfg.Now().UTC()
	if err := s.st.UpdateBuild(ctx, b); err != nil {
		return undo(fmt.Errorf("recording snapshot %s: %w", name, err))
	}
	// The version's success makes the image CREATED with it as its latest
	// active version, in the same store transaction.
	v.State, v.UpdatedAt = store.VersionSuccessful, b.UpdatedAt
	if err := s.st.UpdateImageVersion(ctx, v); err != nil {
		return undo(fmt.Errorf("recording snapshot %s: %w", name, err))
	}
	img, err = s.st.GetImage(ctx, account, name)
	if err != nil {
		return undo(fmt.Errorf("recording snapshot %s: %w", name, err))
	}
	return img, nil
}

// successfulBuild is a SUCCESSFUL one of a version's builds, whose CPU a
// snapshot of one of its microVMs keeps; a version without one (built
// before builds were recorded) gets this host's.
func (s *Server) successfulBuild(builds []store.Build) store.Build {
	for _, b := range builds {
		if b.State == store.BuildSuccessful {
			return b
		}
	}
	return store.Build{Architecture: s.cfg.Architecture, Chipset: "GENERIC", ChipsetGeneration: "1"}
}
