package api

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/metrics"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// DefaultQuota is what each account may use when the operator set nothing
// (flags --quota-*): sized so that one tenant cannot take a whole
// 24 GiB host alone, and a few tenants each fit comfortably.
var DefaultQuota = store.Quota{
	Microvms:     20,
	MemoryMiB:    32768,
	VCPUs:        32,
	Builds:       4,
	StorageBytes: 50 << 30,
}

// quotaError is the AWS shape of a refusal: ServiceQuotaExceededException
// for an account's quota, ServiceUnavailableException (503, retryable) when
// the host is full.
func quotaError(err error) *Error {
	var qe *store.QuotaError
	if errors.As(err, &qe) {
		metrics.QuotaRefusals.WithLabelValues(qe.Quota).Inc()
		return &Error{Status: 402, Type: "ServiceQuotaExceededException", Message: qe.Error(),
			ServiceCode: "lambda", QuotaCode: qe.Quota}
	}
	return &Error{Status: 503, Type: "ServiceUnavailableException", Message: err.Error(), RetryAfter: 10}
}

// admission is what the store needs to check the account's quota with
// the create.
func (s *Server) admission(ctx context.Context, account string) (store.Admission, error) {
	n, err := s.artifactBytes(ctx, account)
	if err != nil {
		return store.Admission{}, err
	}
	return store.Admission{Defaults: s.cfg.Quota, OtherStorageBytes: n + s.uploading.Held(account)}, nil
}

// artifactBytes adds up the sizes of the account's code packages in the
// server's folder: storage the store cannot see (uploads into the store,
// Config.Uploads, it counts itself). Uploads in progress count by what
// they hold (s.uploading), not by what has arrived.
func (s *Server) artifactBytes(ctx context.Context, account string) (int64, error) {
	if s.cfg.Uploads != nil {
		return 0, nil
	}
	if s.cfg.ArtifactDir == "" {
		return 0, nil
	}
	n, err := inflight.StoredBytes(filepath.Join(s.cfg.ArtifactDir, account))
	if err != nil {
		return 0, fmt.Errorf("measuring uploads: %w", err)
	}
	return n, nil
}

// Quota returns an account's effective limits and what it uses (uploads,
// also those in progress, included).
func (s *Server) Quota(ctx context.Context, account string) (store.Quota, store.QuotaUse, error) {
	q, u, err := s.storedQuota(ctx, account)
	u.StorageBytes += s.uploading.Held(account)
	return q, u, err
}

// storedQuota is Quota without the uploads in progress.
func (s *Server) storedQuota(ctx context.Context, account string) (store.Quota, store.QuotaUse, error) {
	o, err := s.st.GetQuotaOverride(ctx, account)
	if err != nil {
		return store.Quota{}, store.QuotaUse{}, err
	}
	u, err := s.st.QuotaUsage(ctx, account)
	if err != nil {
		return store.Quota{}, store.QuotaUse{}, err
	}
	n, err := s.artifactBytes(ctx, account)
	if err != nil {
		return store.Quota{}, store.QuotaUse{}, err
	}
	u.StorageBytes += n
	return o.Apply(s.cfg.Quota), u, nil
}

// getQuota is a kiln extension: the caller's limits and usage.
func (s *Server) getQuota(ctx context.Context, c *call) (any, error) {
	q, u, err := s.Quota(ctx, c.account)
	if err != nil {
		return nil, err
	}
	return map[string]any{"account": c.account, "limits": q, "usage": u}, nil
}

// microvmSize is the guest memory and vCPUs a microVM of v gets: the
// memory its builds recorded (the snapshot's), else the largest
// minimumMemoryInMiB of the image (what the builder gives), else the
// builder's default; the vCPUs the builder gives that memory when the
// image asks for a size (VCPUsFor), else the default.
func (s *Server) microvmSize(ctx context.Context, v store.ImageVersion) (mem, vcpus int64, err error) {
	builds, err := s.versionBuilds(ctx, v)
	if err != nil {
		return 0, 0, err
	}
	mem, vcpus = s.sizeOf(v, builds)
	return mem, vcpus, nil
}

// versionBuilds lists v's builds (a version has a few).
func (s *Server) versionBuilds(ctx context.Context, v store.ImageVersion) ([]store.Build, error) {
	builds, _, err := s.st.ListBuilds(ctx, v.Account, v.ImageName, v.Version, store.Page{Limit: 100})
	return builds, err
}

// sizeOf is microvmSize with v's builds at hand.
func (s *Server) sizeOf(v store.ImageVersion, builds []store.Build) (mem, vcpus int64) {
	for _, b := range builds {
		if b.Snapshot != nil && b.Snapshot.MemorySnapshotSizeInBytes != nil {
			mem = max(mem, *b.Snapshot.MemorySnapshotSizeInBytes>>20)
		}
	}
	if mem == 0 {
		for _, r := range v.Config.Resources {
			mem = max(mem, r.MinimumMemoryInMiB)
		}
	}
	if mem == 0 {
		mem = lifecycle.DefaultMicrovmMemoryMiB
	}
	if len(v.Config.Resources) > 0 {
		return mem, int64(VCPUsFor(mem))
	}
	return mem, int64(s.cfg.MicrovmVCPUs)
}
