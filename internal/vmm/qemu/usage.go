//go:build linux

package qemu

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

var _ vmm.UsageReporter = (*Driver)(nil)

// clockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times: 100 on
// every Linux architecture kiln builds for.
const clockTicks = 100

// Usage implements vmm.UsageReporter from the QEMU process (its CPU time
// and resident memory in /proc) and the VM's own disk overlay (its
// allocated bytes and the qcow2 header's virtual size).
func (d *Driver) Usage(ctx context.Context, id string) (vmm.Usage, error) {
	v, err := d.get(id)
	if err != nil {
		return vmm.Usage{}, err
	}
	info := v.info()
	if info.State != vmm.StateRunning || info.PID == 0 {
		return vmm.Usage{}, fmt.Errorf("vm %s is %s: %w", id, info.State, errdefs.ErrConflict)
	}
	u := vmm.Usage{At: time.Now(), MemorySize: int64(info.MemoryMiB) << 20}
	f, err := procStat(info.PID)
	if err != nil {
		return u, fmt.Errorf("reading vm %s's process: %w", id, err)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	rss, err3 := strconv.ParseInt(f[21], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return u, fmt.Errorf("vm %s's process: malformed stat", id)
	}
	u.CPUTime = time.Duration(utime+stime) * time.Second / clockTicks
	u.ResidentBytes = rss * int64(os.Getpagesize())
	disk := v.path("disk.qcow2")
	var st syscall.Stat_t
	if err := syscall.Stat(disk, &st); err != nil {
		return u, fmt.Errorf("vm %s's disk: %w", id, err)
	}
	u.DiskAllocated = st.Blocks * 512
	h, err := qcow2.ParseFile(disk)
	if err != nil {
		return u, fmt.Errorf("vm %s's disk: %w", id, err)
	}
	u.DiskSize = int64(h.Size)
	return u, nil
}
