package store

import (
	"context"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// UploadScheme names a code package uploaded into the store (Uploads):
// kiln-upload://ACCOUNT/SHA256.zip. In a cluster the upload lands on one
// control replica and is built on some node, so it is named by what it
// is (account and content hash), not by where a host keeps it.
const UploadScheme = "kiln-upload"

// UploadChunkBytes is the size of the rows an upload is stored in: small
// enough that neither the writer nor a reader holds more than a few of
// them in memory, large enough that a 1 GiB package is 1024 rows.
const UploadChunkBytes = 1 << 20

// Upload is a code package kept in the store, keyed by account and the
// SHA-256 of its bytes.
type Upload struct {
	Account string
	// SHA256 is the lower-case hex SHA-256 of the package.
	SHA256    string
	SizeBytes int64
	// CreatedAt is when it was last put or named by a new image version
	// (TouchUpload): garbage collection's grace counts from it.
	CreatedAt time.Time
}

// URI is the upload's kiln-upload:// URI.
func (u Upload) URI() string { return UploadURI(u.Account, u.SHA256) }

// UploadURI is kiln-upload://ACCOUNT/SHA256.zip.
func UploadURI(account, sha256 string) string {
	return UploadScheme + "://" + account + "/" + sha256 + ".zip"
}

var (
	uploadAccountRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	uploadHashRE    = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ParseUploadURI returns the account and hash of a kiln-upload:// URI. The
// URI is the tenant's: anything but exactly kiln-upload://ACCOUNT/SHA256.zip
// (no query, fragment, user, port, dot segments or escapes) is
// errdefs.ErrInvalid.
func ParseUploadURI(uri string) (account, sha256 string, err error) {
	rest, ok := strings.CutPrefix(uri, UploadScheme+"://")
	if ok {
		account, rest, ok = strings.Cut(rest, "/")
	}
	if ok {
		sha256, ok = strings.CutSuffix(rest, ".zip")
	}
	if !ok || !uploadAccountRE.MatchString(account) || !uploadHashRE.MatchString(sha256) {
		return "", "", fmt.Errorf("%q is not an uploaded package's URI (want %s://ACCOUNT/SHA256.zip, the uri the upload answered): %w",
			uri, UploadScheme, errdefs.ErrInvalid)
	}
	return account, sha256, nil
}

// Uploads keeps uploaded code packages in the store, so that every host of
// a cluster reads the same ones. The SQL stores implement it; every call
// is scoped to one account, and no call reads across accounts but
// ListUploads with account "" (garbage collection).
type Uploads interface {
	// PutUpload stores size bytes read from body as the account's upload,
	// in UploadChunkBytes rows, hashing them as they arrive. sha256, when
	// not empty, is what they must hash to; a body of another length or
	// hash is errdefs.ErrInvalid and leaves nothing behind. Putting a
	// package the account already has keeps one copy and renews its
	// CreatedAt. The chunks are written in transactions of their own
	// (a slow client holds no write lock) and the upload appears only
	// once all are in; chunks of a put that died midway are removed by
	// PruneUploadChunks. With adm, the upload is recorded only if its
	// bytes fit the account's StorageBytes quota, checked in the same
	// transaction (the account's uploads in the store counted, as
	// QuotaUsage counts them): a *QuotaError otherwise, and nothing is
	// left. A package the account already has needs no room.
	PutUpload(ctx context.Context, account, sha256 string, size int64, body io.Reader, adm *Admission) (Upload, error)
	// OpenUpload opens the account's upload for reading, one chunk in
	// memory at a time. errdefs.ErrNotFound when the account has none
	// with that hash. A read fails (io.ErrUnexpectedEOF) if the upload is
	// deleted meanwhile; the reader does not check the hash (the caller
	// does, with what it read).
	OpenUpload(ctx context.Context, account, sha256 string) (io.ReadCloser, Upload, error)
	// TouchUpload sets CreatedAt to at, so that garbage collection's grace
	// starts again (an image version about to name it).
	// errdefs.ErrNotFound when the account has no such upload.
	TouchUpload(ctx context.Context, account, sha256 string, at time.Time) error
	// DeleteUpload deletes the upload and its chunks if it was created
	// (or touched) before before, and says whether it did.
	DeleteUpload(ctx context.Context, account, sha256 string, before time.Time) (bool, error)
	// ListUploads lists the account's uploads ("" = every account's),
	// ordered by account and hash.
	ListUploads(ctx context.Context, account string) ([]Upload, error)
	// PruneUploadChunks deletes chunks written before before that belong
	// to no upload (puts that died midway) and returns how many.
	PruneUploadChunks(ctx context.Context, before time.Time) (int, error)
}
