//go:build linux

package hosttool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/jail"
)

// How a libfuse 2 program (fuse2fs on Debian 12) is served a mount it may
// not make. libfuse's fuse_mount_sys stats the mount point, checks that it
// is empty, opens /dev/fuse and calls mount(2); on EPERM, which an
// unprivileged uid always gets, it falls back to fusermount: it makes a
// socket pair, runs /bin/fusermount (FUSERMOUNT_DIR, then PATH) with the
// socket's number in _FUSE_COMMFD, and takes the /dev/fuse descriptor of
// the finished mount from one SCM_RIGHTS message. The real fusermount is
// setuid root; the one in a FUSE tool's jail is kiln's own binary, bound
// read-only over an empty file at /bin/fusermount, which hands over the
// descriptor kiln passed in (Spec.FUSE, already mounted by kiln) and exits.
// When libfuse runs it to unmount ("-u", after a signal) it does nothing:
// kiln unmounts.

// MountPoint is the empty folder inside a FUSE tool's jail to give it as
// its mount point. Nothing is ever mounted there (the mount is kiln's, on
// the host); libfuse only checks that it exists and is empty.
const MountPoint = "/mnt"

// fusermountPath is where libfuse 2 runs fusermount from first.
const fusermountPath = "/bin/fusermount"

// commFDEnv names the socket fusermount sends the descriptor over.
const commFDEnv = "_FUSE_COMMFD"

// fuseMinor is the minor number of /dev/fuse (major 10, misc).
const fuseMinor = 229

func init() {
	// libfuse runs it as "fusermount": only then is this binary the shim.
	if len(os.Args) == 0 || filepath.Base(os.Args[0]) != "fusermount" {
		return
	}
	if err := fusermount(os.Args[1:], os.Getenv(commFDEnv)); err != nil {
		fmt.Fprintf(os.Stderr, "kiln fusermount: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// fusermount is the shim's work: send the one /dev/fuse descriptor this
// process inherited over the socket named by commFD.
func fusermount(args []string, commFD string) error {
	if commFD == "" {
		for _, a := range args {
			if a == "-u" {
				return nil // kiln unmounts its own mount
			}
		}
		return errors.New("only hands over a mount kiln made (no " + commFDEnv + ")")
	}
	sock, err := strconv.Atoi(commFD)
	if err != nil || sock < 0 {
		return fmt.Errorf("%s=%q is no descriptor", commFDEnv, commFD)
	}
	fd, err := inheritedFUSE(sock)
	if err != nil {
		return err
	}
	// libfuse reads one byte with the descriptor attached.
	if err := unix.Sendmsg(sock, []byte{0}, unix.UnixRights(fd), nil, 0); err != nil {
		return fmt.Errorf("sending the /dev/fuse descriptor: %w", err)
	}
	return nil
}

// inheritedFUSE finds the /dev/fuse descriptor among this process's open
// ones (but skip); there must be exactly one.
func inheritedFUSE(skip int) (int, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1, err
	}
	found := -1
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 || fd == skip {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR ||
			unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != fuseMinor {
			continue
		}
		if found >= 0 {
			return -1, errors.New("more than one /dev/fuse descriptor inherited")
		}
		found = fd
	}
	if found < 0 {
		return -1, errors.New("no /dev/fuse descriptor inherited (kiln mounts FUSE file systems itself)")
	}
	return found, nil
}

// fuseJail returns the root and binds of a FUSE tool's jail: the system
// folders, and kiln's own binary as /bin/fusermount.
func fuseJail() (*jailRoot, []jail.Bind, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("finding kiln's binary to serve as fusermount: %w", err)
	}
	fi, err := os.Stat(exe)
	if err != nil {
		return nil, nil, fmt.Errorf("kiln's binary %s (replaced while running?): %w", exe, err)
	}
	if fi.Mode().Perm()&0o001 == 0 {
		return nil, nil, fmt.Errorf("kiln's binary %s has mode %v: FUSE tools run it as fusermount under their own uid, so make it executable by others (0755)", exe, fi.Mode().Perm())
	}
	binds := append(fuseSystemBinds(), jail.Bind{Src: exe, Dst: fusermountPath, ReadOnly: true})
	return fuseRoot, binds, nil
}

// fuseSystemBinds are jail.SystemBinds without /bin, which FUSE tools get
// as a folder of its own.
func fuseSystemBinds() []jail.Bind {
	var out []jail.Bind
	for _, b := range jail.SystemBinds() {
		if filepath.Clean(b.Dst) != "/bin" && !strings.HasPrefix(b.Dst, "/bin/") {
			out = append(out, b)
		}
	}
	return out
}
