//go:build linux

package rootfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
)

// Every e2fsprogs tool that reads an image a guest may have written runs
// confined (hosttool): as an unprivileged uid, in an empty network and a
// new mount namespace, with CPU-time and address-space limits, and with
// the image handed over as descriptor 3 (hosttool.FD). Its output is read up to a bound.

// Output bounds for tool runs.
const (
	maxMessages = 64 << 10 // stderr, e2fsck's and resize2fs's reports
	maxStatOut  = 1 << 20  // debugfs stat (an extent list can be long)
	maxHeader   = 1 << 20  // dumpe2fs -h
)

// errOutputFull is returned by a capped buffer once it is full; the tool
// then dies of a broken pipe instead of printing on.
var errOutputFull = errors.New("tool output over its limit")

// capped keeps up to max bytes; a write past that fails.
type capped struct {
	max int
	buf bytes.Buffer
}

func (c *capped) Write(p []byte) (int, error) {
	room := c.max - c.buf.Len()
	if len(p) > room {
		c.buf.Write(p[:max(room, 0)])
		return max(room, 0), errOutputFull
	}
	return c.buf.Write(p)
}

// toolRun is one confined run of an e2fsprogs tool on image.
type toolRun struct {
	name   string
	image  string
	write  bool     // open the image read-write
	args   []string // "IMAGE" is replaced by the image's descriptor path
	files  []*os.File
	stdin  io.Reader
	maxOut int // bound on stdout; 0 = maxMessages
}

// run runs it and returns stdout and stderr. A stdout over its bound ends
// the tool and yields errOutputFull (with the output so far).
func (t toolRun) run(ctx context.Context) (stdout []byte, stderr string, err error) {
	img, err := hosttool.Open(t.image, t.write)
	if err != nil {
		return nil, "", fmt.Errorf("opening %s for %s: %w", t.image, t.name, err)
	}
	defer img.Close()
	args := make([]string, len(t.args))
	for i, a := range t.args {
		if a == "IMAGE" {
			a = hosttool.FD(0)
		}
		args[i] = a
	}
	if t.maxOut == 0 {
		t.maxOut = maxMessages
	}
	o, e := &capped{max: t.maxOut}, &capped{max: maxMessages}
	cmd, err := hosttool.Command(ctx, hosttool.Spec{
		Path: t.name, Args: args, Files: append([]*os.File{img}, t.files...),
		Stdin: t.stdin, Stdout: o, Stderr: e,
	})
	if err != nil {
		return nil, "", err
	}
	err = cmd.Run()
	if err != nil && ctx.Err() != nil {
		err = ctx.Err() // killed because the caller gave up
	}
	if o.buf.Len() >= t.maxOut {
		return o.buf.Bytes(), e.buf.String(), errOutputFull
	}
	return o.buf.Bytes(), e.buf.String(), err
}
