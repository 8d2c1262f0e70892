package image

import (
	"bytes"
	"strings"
	"sync"
)

// LogTail is an io.Writer that keeps the last lines written to it, so a
// failed build's reason can end with the last lines of its log.
type LogTail struct {
	mu    sync.Mutex
	max   int
	lines []string
	part  []byte
}

// NewLogTail keeps up to n lines.
func NewLogTail(n int) *LogTail { return &LogTail{max: n} }

// maxLine bounds one kept line, so output without newlines cannot grow
// the buffer without limit.
const maxLine = 4096

func (t *LogTail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			t.part = append(t.part, p...)
			if len(t.part) > maxLine {
				t.part = t.part[len(t.part)-maxLine:]
			}
			break
		}
		t.part = append(t.part, p[:i]...)
		if len(t.part) > maxLine {
			t.part = t.part[len(t.part)-maxLine:]
		}
		t.push(string(t.part))
		t.part = t.part[:0]
		p = p[i+1:]
	}
	return n, nil
}

func (t *LogTail) push(line string) {
	t.lines = append(t.lines, strings.TrimRight(line, "\r"))
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

// String returns the kept lines, including an unfinished last line.
func (t *LogTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := t.lines
	if len(t.part) > 0 {
		lines = append(append([]string(nil), lines...), string(t.part))
		if len(lines) > t.max {
			lines = lines[len(lines)-t.max:]
		}
	}
	return strings.Join(lines, "\n")
}
