// Package applog keeps each microVM's output (the app's stdout and stderr
// and the guest's serial console) in files on disk, so that it can be read
// after kiln restarts and after the VM ended.
//
// Every VM has a directory DIR/ID (0700) of segment files (0600) named by
// the absolute offset of their first byte, so that a reader's offset means
// the same byte across rotations and restarts. A VM's log is capped: when
// the newest segment reaches MaxBytes/Segments a new one starts and the
// oldest beyond Segments is removed, so the newest MaxBytes (at most) stay.
//
// Writes never block and never touch the disk on the caller's goroutine:
// they go into a bounded buffer that a flusher per VM writes out. A guest
// that prints faster than the disk takes loses the excess, counted in a
// "[kiln] N bytes of output dropped" line, instead of slowing kiln or
// growing memory.
package applog

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of Options.
const (
	DefaultMaxBytes  = 16 << 20
	DefaultSegments  = 4
	DefaultRetention = 7 * 24 * time.Hour
	// DefaultBuffer is how much output may wait for the disk per VM.
	DefaultBuffer = 256 << 10
)

// endedFile marks a log whose VM ended; its modification time starts the
// retention period.
const endedFile = "ended"

// Options configure a Manager.
type Options struct {
	// MaxBytes caps the bytes kept per VM (DefaultMaxBytes if 0).
	MaxBytes int64
	// Segments is how many files MaxBytes is split into (DefaultSegments
	// if 0; at least 2, so that rotation never empties the log).
	Segments int
	// Retention is how long the log of an ended VM stays
	// (DefaultRetention if 0).
	Retention time.Duration
	// Buffer is how many bytes may wait for the flusher per VM
	// (DefaultBuffer if 0).
	Buffer int
	Log    *slog.Logger
}

// Manager owns the log directories under one root.
type Manager struct {
	dir  string
	opts Options
	log  *slog.Logger

	mu   sync.Mutex
	open map[string]*Writer
}

var idRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// New returns a Manager keeping logs under dir (made 0700 if missing).
func New(dir string, opts Options) (*Manager, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.Segments <= 0 {
		opts.Segments = DefaultSegments
	}
	opts.Segments = max(opts.Segments, 2)
	if opts.Retention <= 0 {
		opts.Retention = DefaultRetention
	}
	if opts.Buffer <= 0 {
		opts.Buffer = DefaultBuffer
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making the log directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("securing the log directory: %w", err)
	}
	return &Manager{dir: dir, opts: opts, log: opts.Log, open: map[string]*Writer{}}, nil
}

// Dir is the directory of id's log.
func (m *Manager) Dir(id string) string { return filepath.Join(m.dir, id) }

func (m *Manager) segCap() int64 { return max(m.opts.MaxBytes/int64(m.opts.Segments), 1) }

// Open returns the writer of id's log, opening it (and continuing an
// existing log at its end) if it is not open yet. Idempotent. A log
// marked ended by Close is reopened (a VM that goes on after a restart).
func (m *Manager) Open(id string) (*Writer, error) {
	if !idRe.MatchString(id) {
		return nil, fmt.Errorf("log id %q is not a valid vm id", id)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if w, ok := m.open[id]; ok {
		return w, nil
	}
	dir := m.Dir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making the log directory of %s: %w", id, err)
	}
	os.Remove(filepath.Join(dir, endedFile))
	segs, err := segments(dir)
	if err != nil {
		return nil, err
	}
	w := &Writer{m: m, id: id, dir: dir, kick: make(chan struct{}, 1), done: make(chan struct{}), stopped: make(chan struct{})}
	if n := len(segs); n > 0 {
		w.segStart, w.segSize = segs[n-1].start, segs[n-1].size
	}
	w.segs = segs
	m.open[id] = w
	go w.flusher()
	return w, nil
}

// Writer returns id's open writer, or nil.
func (m *Manager) Writer(id string) *Writer {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.open[id]
}

// Console returns a writer for the guest console of id that finds id's
// open log at each write, and discards what comes while none is open
// (logging disabled, or before the engine opened it).
func (m *Manager) Console(id string) io.Writer { return consoleWriter{m: m, id: id} }

type consoleWriter struct {
	m  *Manager
	id string
}

func (c consoleWriter) Write(p []byte) (int, error) {
	if w := c.m.Writer(c.id); w != nil {
		w.Write(p)
	}
	return len(p), nil
}

// Close flushes id's log, closes it and marks it ended: Sweep removes it
// once the retention period has passed. Closing a log not open only
// marks it (if it exists).
func (m *Manager) Close(id string) error {
	if !idRe.MatchString(id) {
		return nil
	}
	m.mu.Lock()
	w := m.open[id]
	delete(m.open, id)
	m.mu.Unlock()
	if w != nil {
		w.stop()
	}
	err := os.WriteFile(filepath.Join(m.Dir(id), endedFile), nil, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// Detach flushes and closes id's log without marking it ended: the VM
// lives on (kiln is stopping).
func (m *Manager) Detach(id string) {
	m.mu.Lock()
	w := m.open[id]
	delete(m.open, id)
	m.mu.Unlock()
	if w != nil {
		w.stop()
	}
}

// CloseAll detaches every open log (kiln is stopping).
func (m *Manager) CloseAll() {
	m.mu.Lock()
	ids := make([]string, 0, len(m.open))
	for id := range m.open {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	for _, id := range ids {
		m.Detach(id)
	}
}

// Remove deletes id's log (logging disabled: nothing is kept).
func (m *Manager) Remove(id string) error {
	if !idRe.MatchString(id) {
		return nil
	}
	m.Detach(id)
	return os.RemoveAll(m.Dir(id))
}

// Exists reports whether anything of id's log is on disk.
func (m *Manager) Exists(id string) bool {
	if !idRe.MatchString(id) {
		return false
	}
	_, err := os.Stat(m.Dir(id))
	return err == nil
}

// Sweep removes logs whose VM ended more than the retention period before
// now, and logs that are not open and were not written for that long
// (left by a VM whose end was never recorded). It returns the ids removed.
func (m *Manager) Sweep(now time.Time) ([]string, error) {
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, fmt.Errorf("listing logs: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		id := e.Name()
		if !e.IsDir() || !idRe.MatchString(id) || m.Writer(id) != nil {
			continue
		}
		if !m.expired(id, now) {
			continue
		}
		m.mu.Lock()
		_, reopened := m.open[id]
		m.mu.Unlock()
		if reopened {
			continue
		}
		if err := os.RemoveAll(m.Dir(id)); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, id)
	}
	return removed, errors.Join(errs...)
}

// expired says whether id's log is older than the retention period:
// counted from its end mark, or else from its newest write.
func (m *Manager) expired(id string, now time.Time) bool {
	dir := m.Dir(id)
	if st, err := os.Stat(filepath.Join(dir, endedFile)); err == nil {
		return now.Sub(st.ModTime()) > m.opts.Retention
	}
	newest := time.Time{}
	if st, err := os.Stat(dir); err == nil {
		newest = st.ModTime()
	}
	segs, _ := segments(dir)
	for _, s := range segs {
		if s.mod.After(newest) {
			newest = s.mod
		}
	}
	return now.Sub(newest) > m.opts.Retention
}

// Read returns at most limit bytes of id's log from offset, and the offset
// after them. An offset before the oldest byte kept starts at the oldest
// byte; at the end it returns no data and the end offset. A missing log
// reads as empty.
func (m *Manager) Read(id string, offset int64, limit int) ([]byte, int64, error) {
	if !idRe.MatchString(id) || limit <= 0 {
		return nil, offset, nil
	}
	dir := m.Dir(id)
	// A rotation may remove the segment between listing and opening it:
	// list again (the data moved on, the offset did not).
	for try := 0; ; try++ {
		segs, err := segments(dir)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, offset, nil
			}
			return nil, offset, err
		}
		if len(segs) == 0 {
			return nil, offset, nil
		}
		offset = max(offset, segs[0].start)
		i := sort.Search(len(segs), func(i int) bool { return segs[i].start > offset }) - 1
		s := segs[i]
		end := s.start + s.size
		if i+1 < len(segs) {
			end = segs[i+1].start
		}
		if offset >= end {
			if i+1 < len(segs) {
				offset = segs[i+1].start
				continue
			}
			return nil, end, nil
		}
		data, err := readAt(filepath.Join(dir, s.name), offset-s.start, int(min(int64(limit), end-offset)))
		if errors.Is(err, fs.ErrNotExist) && try < 3 {
			continue
		}
		if err != nil {
			return nil, offset, fmt.Errorf("reading log of %s: %w", id, err)
		}
		return data, offset + int64(len(data)), nil
	}
}

func readAt(path string, off int64, n int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	k, err := f.ReadAt(b, off)
	if err == io.EOF {
		err = nil
	}
	return b[:k], err
}

// segment is one file of a log.
type segment struct {
	name        string
	start, size int64
	mod         time.Time
}

const segSuffix = ".log"

func segName(start int64) string { return fmt.Sprintf("%020d%s", start, segSuffix) }

// parseSegName reads the start offset out of a segment's file name.
func parseSegName(name string) (int64, bool) {
	digits, ok := strings.CutSuffix(name, segSuffix)
	if !ok || len(digits) != 20 {
		return 0, false
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// segments lists dir's segments, oldest first.
func segments(dir string) ([]segment, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []segment
	for _, e := range ents {
		start, ok := parseSegName(e.Name())
		if !ok || !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		out = append(out, segment{name: e.Name(), start: start, size: info.Size(), mod: info.ModTime()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].start < out[j].start })
	return out, nil
}
