//go:build linux

// Package busybox makes the small guests that the engine's benchmarks,
// `kiln engine demo` and the VM tests run: a busybox root disk and a
// template of an HTTP app on it. It is linked into kiln for `kiln bench`;
// what only tests need stays in vmmtest.
package busybox

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Root makes a small ext4 root disk holding busybox and its applets.
func Root(dir string) (string, error) {
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "mnt", "usr/bin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return "", err
		}
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil {
		return "", err
	}
	list, err := exec.Command(bb, "--list").Output()
	if err != nil {
		return "", err
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		os.Symlink("busybox", filepath.Join(root, "bin", applet))
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n",
		"etc/group":  "root:x:0:\nnogroup:x:65534:\napp:x:1000:\n",
		"etc/hosts":  "127.0.0.1 localhost\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	img := filepath.Join(dir, "root.ext4")
	cmd := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, "-L", "root", "-E", "root_owner=0:0", img, "64M")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	return img, nil
}
