package storetest

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// templateFiles: E2B template files come back byte for byte across
// chunks, to their own account only; a put of the same hash replaces the
// bytes and leaves no stray chunk; a body of the wrong length leaves
// nothing; the upload prune spares template files' chunks.
func templateFiles(t *testing.T, s store.Store) {
	tf, ok := s.(store.TemplateFiles)
	if !ok {
		t.Fatalf("%T does not keep template files (store.TemplateFiles)", s)
	}
	read := func(account, hash string) ([]byte, error) {
		rc, _, err := tf.OpenTemplateFile(ctx, account, hash)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		return io.ReadAll(rc)
	}
	big := make([]byte, store.UploadChunkBytes+store.UploadChunkBytes/2)
	rand.NewChaCha8([32]byte{2}).Read(big)
	const h = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	f, err := tf.PutTemplateFile(ctx, "A", h, int64(len(big)), bytes.NewReader(big))
	must(t, err)
	if f.Account != "A" || f.Hash != h || f.SizeBytes != int64(len(big)) {
		t.Errorf("PutTemplateFile = %+v", f)
	}
	got, err := read("A", h)
	must(t, err)
	if !bytes.Equal(got, big) {
		t.Fatalf("read back %d bytes, want %d", len(got), len(big))
	}
	// Another account knows the hash but has no such files.
	_, err = read("B", h)
	is(t, err, errdefs.ErrNotFound)
	if l, _ := tf.ListTemplateFiles(ctx, "B"); len(l) != 0 {
		t.Errorf("ListTemplateFiles(B) = %+v", l)
	}
	// The prune of abandoned upload chunks leaves template files whole.
	if n, err := s.(store.Uploads).PruneUploadChunks(ctx, time.Now().Add(time.Hour)); err != nil || n != 0 {
		t.Errorf("PruneUploadChunks removed %d chunks of template files (%v)", n, err)
	}

	// Replacing: the old reader fails, the new bytes read back, and the
	// old chunks are gone.
	old, _, err := tf.OpenTemplateFile(ctx, "A", h)
	must(t, err)
	defer old.Close()
	small := []byte("tar bytes")
	_, err = tf.PutTemplateFile(ctx, "A", h, int64(len(small)), bytes.NewReader(small))
	must(t, err)
	if _, err := io.ReadAll(old); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("reading replaced files: %v, want io.ErrUnexpectedEOF", err)
	}
	if got, err := read("A", h); err != nil || !bytes.Equal(got, small) {
		t.Errorf("after replacing: %q, %v", got, err)
	}
	if n, _ := s.(store.Uploads).PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("replacing left %d stray chunks", n)
	}

	// A body shorter or longer than declared leaves nothing.
	for _, size := range []int64{int64(len(small)) + 1, int64(len(small)) - 1} {
		_, err := tf.PutTemplateFile(ctx, "C", h, size, bytes.NewReader(small))
		is(t, err, errdefs.ErrInvalid)
	}
	if l, _ := tf.ListTemplateFiles(ctx, "C"); len(l) != 0 {
		t.Errorf("refused puts left files: %+v", l)
	}
	l, err := tf.ListTemplateFiles(ctx, "A")
	must(t, err)
	if len(l) != 1 || l[0].Hash != h || l[0].SizeBytes != int64(len(small)) {
		t.Errorf("ListTemplateFiles(A) = %+v", l)
	}
}
