// Package initramfs builds the initramfs every kiln guest boots: the agent
// as /init plus the kernel modules it loads before switching root.
package initramfs

import (
	"fmt"
	"io"
	"io/fs"
	"strings"
)

// cpioWriter writes the "newc" (SVR4, no CRC) cpio format the kernel reads.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	off int64
	err error
}

const newcMagic = "070701"

// entry is one archive member.
type entry struct {
	name  string
	mode  uint32 // full st_mode: type bits and permissions
	rdevM uint32 // char/block devices
	rdevm uint32
	data  []byte
}

// cpio st_mode type bits.
const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFCHR = 0o020000
	sIFLNK = 0o120000
)

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) add(e entry) error {
	name := strings.TrimPrefix(e.name, "/")
	if name == "" || strings.Contains(name, "\x00") {
		return fmt.Errorf("invalid cpio entry name %q", e.name)
	}
	c.ino++
	nlink := 1
	if e.mode&0o170000 == sIFDIR {
		nlink = 2
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic, c.ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdevM, e.rdevm, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad()
	c.write(e.data)
	c.pad()
	return c.err
}

func (c *cpioWriter) close() error {
	c.ino = 0
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len("TRAILER!!!")+1, 0)
	c.write([]byte(hdr))
	c.write([]byte("TRAILER!!!\x00"))
	c.pad()
	return c.err
}

func dir(name string) entry { return entry{name: name, mode: sIFDIR | 0o755} }

func file(name string, perm fs.FileMode, data []byte) entry {
	return entry{name: name, mode: sIFREG | uint32(perm.Perm()), data: data}
}
