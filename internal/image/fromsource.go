//go:build linux

package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/image/source"
)

// BuildSource fetches the code package at location (see source.Fetch)
// into a fresh folder under DataDir/tmp, builds it with req (whose
// ContextDir is set here), and removes the folder whatever happens.
func (b *Builder) BuildSource(ctx context.Context, location string, cfg source.Config, req Request) (*Result, error) {
	if req.Log == nil {
		req.Log = io.Discard
	}
	if err := os.MkdirAll(filepath.Join(b.DataDir, "tmp"), 0o700); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Join(b.DataDir, "tmp"), "context-")
	if err != nil {
		return nil, fmt.Errorf("creating build context folder: %w", err)
	}
	defer os.RemoveAll(dir)
	// Fetch into a child so the download can sit beside it, inside dir.
	ctxDir := filepath.Join(dir, "context")
	if err := os.Mkdir(ctxDir, 0o755); err != nil {
		return nil, err
	}
	fmt.Fprintf(req.Log, "#fetch %s\n", redactLocation(location))
	if err := source.Fetch(ctx, location, ctxDir, cfg); err != nil {
		return nil, &StepError{Stage: -1, Instruction: "fetch code package", Err: err}
	}
	req.ContextDir = ctxDir
	return b.Build(ctx, req)
}

// FailureReason is the text a failed build's version records: the step
// that failed and the error, then the last lines of the build log.
func FailureReason(err error, tail *LogTail) string {
	var b strings.Builder
	var se *StepError
	switch {
	case errors.As(err, &se) && se.Line > 0:
		fmt.Fprintf(&b, "%s failed at line %d: %v", se.Instruction, se.Line, se.Err)
	case errors.As(err, &se):
		fmt.Fprintf(&b, "%s failed: %v", se.Instruction, se.Err)
	default:
		fmt.Fprintf(&b, "build failed: %v", err)
	}
	if tail != nil {
		if t := strings.TrimSpace(tail.String()); t != "" {
			b.WriteString("\nlast lines of the build log:\n")
			b.WriteString(t)
		}
	}
	return b.String()
}

func redactLocation(l string) string {
	if i := strings.IndexByte(l, '?'); i >= 0 {
		return l[:i]
	}
	return l
}
