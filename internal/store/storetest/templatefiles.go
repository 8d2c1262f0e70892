package storetest

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// templateFiles: E2B template files come back byte for byte across
// chunks, to their own account only; a put of the same hash replaces the
// bytes and leaves no stray chunk; a body of the wrong length leaves
// nothing; the upload prune spares template files' chunks; a touch
// renews only its own account's files, and deletes honour the time.
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
	f, err := tf.PutTemplateFile(ctx, "A", h, int64(len(big)), bytes.NewReader(big), 0)
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
	_, err = tf.PutTemplateFile(ctx, "A", h, int64(len(small)), bytes.NewReader(small), 0)
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
		_, err := tf.PutTemplateFile(ctx, "C", h, size, bytes.NewReader(small), 0)
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

	// Touch and conditional delete, as garbage collection uses them: the
	// touch of A's files leaves D's files of the same hash as they were.
	const h2 = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
	_, err = tf.PutTemplateFile(ctx, "D", h, int64(len(small)), bytes.NewReader(small), 0)
	must(t, err)
	_, err = tf.PutTemplateFile(ctx, "D", h2, int64(len(small)), bytes.NewReader(small), 0)
	must(t, err)
	is(t, tf.TouchTemplateFile(ctx, "B", h, time.Now()), errdefs.ErrNotFound)
	past, future := time.Now().Add(-48*time.Hour), time.Now().Add(48*time.Hour)
	must(t, tf.TouchTemplateFile(ctx, "A", h, future))
	all, err := tf.ListTemplateFiles(ctx, "")
	must(t, err)
	if len(all) != 3 || all[0].Account != "A" || all[1].Account != "D" || all[1].Hash != h || all[2].Hash != h2 {
		t.Fatalf("ListTemplateFiles(all) = %+v", all)
	}
	if all[0].CreatedAt.Sub(future).Abs() > time.Millisecond {
		t.Errorf("touched A's files: CreatedAt %v, want %v", all[0].CreatedAt, future)
	}
	if all[1].CreatedAt.After(time.Now()) {
		t.Errorf("touching A's files renewed D's: %+v", all[1])
	}
	// A's files were touched after the cut: they stay.
	if ok, err := tf.DeleteTemplateFile(ctx, "A", h, time.Now()); err != nil || ok {
		t.Errorf("DeleteTemplateFile of touched files = %v, %v", ok, err)
	}
	must(t, tf.TouchTemplateFile(ctx, "D", h, past))
	if ok, err := tf.DeleteTemplateFile(ctx, "D", h, time.Now().Add(-time.Hour)); err != nil || !ok {
		t.Errorf("DeleteTemplateFile of unused files = %v, %v", ok, err)
	}
	if ok, err := tf.DeleteTemplateFile(ctx, "D", h, time.Now()); err != nil || ok {
		t.Errorf("DeleteTemplateFile again = %v, %v", ok, err)
	}
	_, err = read("D", h)
	is(t, err, errdefs.ErrNotFound)
	if got, err := read("D", h2); err != nil || !bytes.Equal(got, small) {
		t.Errorf("D's other files after the delete: %q, %v", got, err)
	}
	if got, err := read("A", h); err != nil || !bytes.Equal(got, small) {
		t.Errorf("A's files after D's delete: %q, %v", got, err)
	}
	if n, _ := s.(store.Uploads).PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("deleting template files left %d stray chunks", n)
	}
}

// templateFilesBound: puts that each fit an account's bound alone do not
// pass it together, a refused one leaves no chunk, and replacing files
// counts only the new bytes.
func templateFilesBound(t *testing.T, s store.Store) {
	tf := s.(store.TemplateFiles)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := strings.Repeat(string(rune('a'+i)), 64)
			_, errs[i] = tf.PutTemplateFile(ctx, "A", h, 100, bytes.NewReader(make([]byte, 100)), 250)
		}()
	}
	wg.Wait()
	var kept string
	ok := 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
			kept = strings.Repeat(string(rune('a'+i)), 64)
		case !errors.Is(err, errdefs.ErrExhausted):
			t.Errorf("a put past the bound: %v", err)
		}
	}
	files, err := tf.ListTemplateFiles(ctx, "A")
	must(t, err)
	if ok != 2 || len(files) != 2 {
		t.Errorf("%d of 4 puts of 100 bytes passed a bound of 250, %d kept; want 2 and 2", ok, len(files))
	}
	if n, _ := s.(store.Uploads).PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("refused puts left %d chunks", n)
	}
	_, err = tf.PutTemplateFile(ctx, "A", kept, 150, bytes.NewReader(make([]byte, 150)), 250)
	must(t, err)
}
