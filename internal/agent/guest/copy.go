//go:build linux

package guest

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"github.com/kiln-sandbox/kiln/internal/tartree"
	"golang.org/x/sys/unix"
)

var errStreamClosed = errors.New("copy stream closed")

// copyStream is one tar stream between host and guest. Data moves one chunk
// per request (the host waits for each answer), so a slow disk or a slow
// host only slows that stream, never the rest of the channel.
type copyStream struct {
	id   uint64
	in   *io.PipeWriter // copy-in: chunks go here, the extractor reads
	out  *io.PipeReader // copy-out: the archiver writes, reads come from here
	done chan struct{}  // copy-in: extractor finished
	err  error          // copy-in: extractor result, valid after done
}

func (s *Server) addStream(st *copyStream) {
	s.mu.Lock()
	s.streams[st.id] = st
	s.mu.Unlock()
}

func (s *Server) getStream(id uint64) (*copyStream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.streams[id]
	if !ok {
		return nil, fmt.Errorf("copy stream %d not found", id)
	}
	return st, nil
}

func (s *Server) closeStream(id uint64) {
	s.mu.Lock()
	st, ok := s.streams[id]
	delete(s.streams, id)
	s.mu.Unlock()
	if ok {
		st.abort()
	}
}

// closeStreams aborts all copy streams (their host session is gone).
func (s *Server) closeStreams() {
	s.mu.Lock()
	all := s.streams
	s.streams = map[uint64]*copyStream{}
	s.mu.Unlock()
	for _, st := range all {
		st.abort()
	}
}

func (st *copyStream) abort() {
	if st.in != nil {
		st.in.CloseWithError(errStreamClosed)
	}
	if st.out != nil {
		st.out.CloseWithError(errStreamClosed)
	}
}

func (s *Server) copyInOpen(req proto.CopyInOpen) (proto.StreamResult, error) {
	if !filepath.IsAbs(req.Dir) {
		return proto.StreamResult{}, fmt.Errorf("copy in: destination %q is not absolute", req.Dir)
	}
	if err := s.asUser(req.User, func() error { return os.MkdirAll(req.Dir, 0o755) }); err != nil {
		return proto.StreamResult{}, fmt.Errorf("copy in: %w", err)
	}
	pr, pw := io.Pipe()
	st := &copyStream{id: s.nextID.Add(1), in: pw, done: make(chan struct{})}
	go func() {
		// As another user, entries belong to that user: no chown.
		chown := req.User == "" && os.Getuid() == 0
		st.err = s.asUser(req.User, func() error { return extractTar(req.Dir, pr, chown) })
		// Unblock a writer if extraction stopped early, and drain nothing more.
		if st.err != nil {
			pr.CloseWithError(st.err)
		} else {
			_, _ = io.Copy(io.Discard, pr) // tar padding after the end marker
		}
		close(st.done)
	}()
	s.addStream(st)
	return proto.StreamResult{StreamID: st.id}, nil
}

func (s *Server) copyInData(ctx context.Context, req proto.StreamData) error {
	st, err := s.getStream(req.StreamID)
	if err != nil {
		return err
	}
	if st.in == nil {
		return fmt.Errorf("copy stream %d is not a copy-in stream", req.StreamID)
	}
	if len(req.Data) > 0 {
		if _, err := st.in.Write(req.Data); err != nil {
			s.closeStream(st.id)
			<-st.done
			if st.err != nil {
				return fmt.Errorf("copy in: %w", st.err)
			}
			return fmt.Errorf("copy in: %w", err)
		}
	}
	if !req.EOF {
		return nil
	}
	st.in.Close()
	defer s.closeStream(st.id)
	select {
	case <-st.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if st.err != nil {
		return fmt.Errorf("copy in: %w", st.err)
	}
	return nil
}

func (s *Server) copyOutOpen(req proto.CopyOutOpen) (proto.StreamResult, error) {
	if !filepath.IsAbs(req.Path) {
		return proto.StreamResult{}, fmt.Errorf("copy out: source %q is not absolute", req.Path)
	}
	if err := s.asUser(req.User, func() error { _, err := os.Lstat(req.Path); return err }); err != nil {
		return proto.StreamResult{}, fmt.Errorf("copy out: %w", err)
	}
	pr, pw := io.Pipe()
	st := &copyStream{id: s.nextID.Add(1), out: pr}
	go func() {
		pw.CloseWithError(s.asUser(req.User, func() error {
			return tartree.WriteTar(pw, req.Path, filepath.Base(filepath.Clean(req.Path)))
		}))
	}()
	s.addStream(st)
	return proto.StreamResult{StreamID: st.id}, nil
}

func (s *Server) copyOutRead(ctx context.Context, req proto.StreamData) (proto.StreamData, error) {
	st, err := s.getStream(req.StreamID)
	if err != nil {
		return proto.StreamData{}, err
	}
	if st.out == nil {
		return proto.StreamData{}, fmt.Errorf("copy stream %d is not a copy-out stream", req.StreamID)
	}
	buf := make([]byte, proto.MaxCopyChunk)
	n, err := io.ReadFull(st.out, buf)
	res := proto.StreamData{StreamID: st.id, Data: buf[:n]}
	switch {
	case err == nil:
		return res, nil
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		res.EOF = true
		s.closeStream(st.id)
		return res, nil
	default:
		s.closeStream(st.id)
		return proto.StreamData{}, fmt.Errorf("copy out: %w", err)
	}
}

// extractTar unpacks a tar stream under dir. Entry names are confined to dir
// ("../" cannot climb out); ownership is kept when running as root.
func extractTar(dir string, r io.Reader, chown bool) error {
	tr := tar.NewReader(r)
	type dirTime struct {
		path string
		t    time.Time
	}
	var dirTimes []dirTime
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("reading tar: %w", err)
		}
		rel := filepath.Clean("/" + hdr.Name)
		target := filepath.Join(dir, rel)
		if rel != "/" {
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
		}
		// Permission bits only here; setuid and friends are applied by the
		// chmod below (tar stores them as raw bits, FileMode does not).
		mode := fs.FileMode(hdr.Mode & 0o777)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
			dirTimes = append(dirTimes, dirTime{target, hdr.ModTime})
		case tar.TypeReg, tar.TypeRegA:
			if err := replaceNonDir(target); err != nil {
				return err
			}
			f, err := os.OpenFile(target, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("writing %s: %w", target, err)
			}
		case tar.TypeSymlink:
			if err := replaceNonDir(target); err != nil {
				return err
			}
			if err := os.Symlink(hdr.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			src := filepath.Join(dir, filepath.Clean("/"+hdr.Linkname))
			if err := replaceNonDir(target); err != nil {
				return err
			}
			if err := os.Link(src, target); err != nil {
				return err
			}
			continue // shares the source's metadata
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			if err := replaceNonDir(target); err != nil {
				return err
			}
			kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
			dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
			if err := unix.Mknod(target, kind|uint32(mode), int(dev)); err != nil {
				return fmt.Errorf("mknod %s: %w", target, err)
			}
		default:
			continue // xattrs, GNU extensions: nothing to create
		}
		if chown {
			_ = os.Lchown(target, hdr.Uid, hdr.Gid)
		}
		if hdr.Typeflag != tar.TypeSymlink {
			// Chmod after chown: chown clears setuid bits.
			_ = unix.Chmod(target, uint32(hdr.Mode&0o7777))
		}
		if hdr.Typeflag != tar.TypeDir {
			ts := []unix.Timespec{unix.NsecToTimespec(hdr.AccessTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
			if hdr.AccessTime.IsZero() {
				ts[0] = ts[1]
			}
			_ = unix.UtimesNanoAt(unix.AT_FDCWD, target, ts, unix.AT_SYMLINK_NOFOLLOW)
		}
	}
	// Directory times last: creating entries inside changes them.
	for i := len(dirTimes) - 1; i >= 0; i-- {
		d := dirTimes[i]
		_ = os.Chtimes(d.path, d.t, d.t)
	}
	return nil
}

// replaceNonDir removes whatever non-directory is at path, so a tar entry
// replaces it (as tar does) instead of writing through a symlink.
func replaceNonDir(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s: is a directory", path)
	}
	return os.Remove(path)
}
