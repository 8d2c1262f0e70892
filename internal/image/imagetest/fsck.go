//go:build linux

package imagetest

import (
	"context"
	"fmt"
	"os/exec"
)

// fsck checks an ext4 image read-only.
func fsck(ctx context.Context, disk string) error {
	tool := "e2fsck"
	if p, err := exec.LookPath(tool); err == nil {
		tool = p
	} else {
		tool = "/usr/sbin/e2fsck"
	}
	out, err := exec.CommandContext(ctx, tool, "-n", "-f", disk).CombinedOutput()
	if err != nil {
		return fmt.Errorf("e2fsck -n %s: %v\n%s", disk, err, out)
	}
	return nil
}
