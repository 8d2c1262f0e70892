package store

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// TemplateFile is the files of an E2B template's COPY step, uploaded by
// the E2B SDK as a tar(.gz) and named by the SDK's hash of the files (not
// the SHA-256 of the tar, so the store cannot check it).
type TemplateFile struct {
	Account   string
	Hash      string
	SizeBytes int64
	// CreatedAt is when it was last put or used (TouchTemplateFile):
	// garbage collection removes files unused for a retention period.
	CreatedAt time.Time
}

// TemplateFiles keeps E2B template files in the store, so that a
// cluster's control replicas all see an upload whichever of them took it
// (one host keeps them as files). The bytes are chunked as Uploads' are.
// Every call is scoped to one account but ListTemplateFiles with account
// "" (garbage collection).
type TemplateFiles interface {
	// PutTemplateFile stores size bytes read from body as the account's
	// files of hash, replacing any it had (as a file upload overwrites):
	// a reader of the replaced files then fails (io.ErrUnexpectedEOF). A
	// body of another length is errdefs.ErrInvalid and leaves nothing.
	// With max > 0, the files are recorded only if the account's files,
	// these included (the ones they replace not), then take at most max
	// bytes, checked in the same transaction so that puts on several
	// hosts cannot pass it together: a *TemplateFilesFullError otherwise
	// (errdefs.ErrExhausted), and nothing is left.
	PutTemplateFile(ctx context.Context, account, hash string, size int64, body io.Reader, max int64) (TemplateFile, error)
	// OpenTemplateFile opens the account's files of hash, one chunk in
	// memory at a time; errdefs.ErrNotFound when it has none.
	OpenTemplateFile(ctx context.Context, account, hash string) (io.ReadCloser, TemplateFile, error)
	// TouchTemplateFile sets CreatedAt to at (the files were used: the
	// SDK found them present, or a build read them), so that they are
	// kept a retention period longer. errdefs.ErrNotFound when the
	// account has no files of hash.
	TouchTemplateFile(ctx context.Context, account, hash string, at time.Time) error
	// DeleteTemplateFile deletes the files and their chunks if they were
	// put or touched before before, and says whether it did: a put or
	// touch on another replica after garbage collection listed them wins.
	DeleteTemplateFile(ctx context.Context, account, hash string, before time.Time) (bool, error)
	// ListTemplateFiles lists the account's template files ("" = every
	// account's), ordered by account and hash.
	ListTemplateFiles(ctx context.Context, account string) ([]TemplateFile, error)
}

// TemplateFilesFullError is PutTemplateFile's refusal at its bound.
type TemplateFilesFullError struct {
	Kept, Need, Max int64 // bytes the account keeps, the put's, the bound
}

func (e *TemplateFilesFullError) Error() string {
	return fmt.Sprintf("the account keeps %d bytes of template files; these %d would pass its %d bytes", e.Kept, e.Need, e.Max)
}

func (e *TemplateFilesFullError) Unwrap() error { return errdefs.ErrExhausted }
