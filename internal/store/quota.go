package store

import (
	"fmt"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Quota names, as QuotaError and the API's quotaCode report them.
const (
	QuotaMicrovms     = "Microvms"
	QuotaMemoryMiB    = "MemoryMiB"
	QuotaVCPUs        = "Vcpus"
	QuotaBuilds       = "ConcurrentBuilds"
	QuotaStorageBytes = "StorageBytes"
)

// Quota is an account's limits. A negative field is no limit; zero allows
// none.
type Quota struct {
	// Microvms counts microVMs that are not TERMINATED.
	Microvms int64 `json:"microvms"`
	// MemoryMiB and VCPUs add up Microvm.MemoryMiB and Microvm.VCPUs of
	// those microVMs (SUSPENDED ones included: they may resume).
	MemoryMiB int64 `json:"memoryMiB"`
	VCPUs     int64 `json:"vcpus"`
	// Builds counts builds PENDING or IN_PROGRESS (queued ones included).
	Builds int64 `json:"builds"`
	// StorageBytes bounds QuotaUse.StorageBytes.
	StorageBytes int64 `json:"storageBytes"`
}

// QuotaOverride is what the operator set for one account (`kiln quotas
// set`); nil fields take the server's default.
type QuotaOverride struct {
	Microvms     *int64 `json:"microvms,omitempty"`
	MemoryMiB    *int64 `json:"memoryMiB,omitempty"`
	VCPUs        *int64 `json:"vcpus,omitempty"`
	Builds       *int64 `json:"builds,omitempty"`
	StorageBytes *int64 `json:"storageBytes,omitempty"`
}

// Apply returns the defaults with o's fields over them.
func (o QuotaOverride) Apply(d Quota) Quota {
	set := func(dst *int64, v *int64) {
		if v != nil {
			*dst = *v
		}
	}
	set(&d.Microvms, o.Microvms)
	set(&d.MemoryMiB, o.MemoryMiB)
	set(&d.VCPUs, o.VCPUs)
	set(&d.Builds, o.Builds)
	set(&d.StorageBytes, o.StorageBytes)
	return d
}

// QuotaUse is what an account uses of each quota, as the store counts it.
type QuotaUse struct {
	Microvms  int64 `json:"microvms"`
	MemoryMiB int64 `json:"memoryMiB"`
	VCPUs     int64 `json:"vcpus"`
	Builds    int64 `json:"builds"`
	// SnapshotBytes adds up the memory and disk snapshot sizes recorded by
	// the SUCCESSFUL builds of the account's image versions (the template
	// each version keeps on disk). StorageBytes is SnapshotBytes plus
	// the account's uploads in the store (Uploads) plus what the caller
	// measured outside the store (Admission.OtherStorageBytes: code
	// packages in a server's folder, uploads still arriving).
	SnapshotBytes int64 `json:"snapshotBytes"`
	StorageBytes  int64 `json:"storageBytes"`
}

// Admission asks a create to check the account's quota in the same
// transaction as the insert, so that concurrent creates cannot together
// pass a limit that each alone respects.
type Admission struct {
	// Defaults are the server's limits; the account's QuotaOverride, read
	// in the transaction, applies over them.
	Defaults Quota
	// OtherStorageBytes is storage the store cannot see (the account's
	// uploaded code artifacts), counted toward Quota.StorageBytes.
	OtherStorageBytes int64
}

// QuotaError is a create refused by an account's quota. It wraps
// errdefs.ErrExhausted.
type QuotaError struct {
	Account   string
	Quota     string // one of the Quota* names
	Limit     int64
	Used      int64
	Requested int64
}

func (e *QuotaError) Error() string {
	if e.Requested == 0 {
		return fmt.Sprintf("quota %s of account %s exceeded: limit %d, in use %d; free some (delete image versions or uploads), or ask the operator to raise it (kiln quotas set)",
			e.Quota, e.Account, e.Limit, e.Used)
	}
	free := "end some (terminate microVMs, or wait for builds to finish)"
	if e.Quota == QuotaStorageBytes {
		free = "free some (delete image versions or uploads)"
	}
	return fmt.Sprintf("quota %s of account %s exceeded: limit %d, in use %d, this request needs %d more; %s, or ask the operator to raise it (kiln quotas set)",
		e.Quota, e.Account, e.Limit, e.Used, e.Requested, free)
}

func (e *QuotaError) Unwrap() error { return errdefs.ErrExhausted }

// Check returns a *QuotaError if adding need to u would pass q. A build
// (need.Builds > 0) is refused storage only once the account is over its
// limit, since what a build will store is not known before it runs.
func (q Quota) Check(account string, u QuotaUse, need QuotaUse) error {
	for _, c := range []struct {
		name              string
		limit, used, need int64
	}{
		{QuotaMicrovms, q.Microvms, u.Microvms, need.Microvms},
		{QuotaMemoryMiB, q.MemoryMiB, u.MemoryMiB, need.MemoryMiB},
		{QuotaVCPUs, q.VCPUs, u.VCPUs, need.VCPUs},
		{QuotaBuilds, q.Builds, u.Builds, need.Builds},
	} {
		if c.need > 0 && c.limit >= 0 && c.used+c.need > c.limit {
			return &QuotaError{Account: account, Quota: c.name, Limit: c.limit, Used: c.used, Requested: c.need}
		}
	}
	full := u.StorageBytes+need.StorageBytes > q.StorageBytes || (need.StorageBytes == 0 && u.StorageBytes >= q.StorageBytes)
	if (need.Builds > 0 || need.StorageBytes > 0) && q.StorageBytes >= 0 && full {
		return &QuotaError{Account: account, Quota: QuotaStorageBytes, Limit: q.StorageBytes, Used: u.StorageBytes, Requested: need.StorageBytes}
	}
	return nil
}
