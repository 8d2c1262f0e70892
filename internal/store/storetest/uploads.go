package storetest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

func hashOf(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func readUpload(t *testing.T, u store.Uploads, account, sha string) []byte {
	t.Helper()
	rc, _, err := u.OpenUpload(ctx, account, sha)
	must(t, err)
	defer rc.Close()
	b, err := io.ReadAll(rc)
	must(t, err)
	return b
}

// uploads: a package put in the store comes back byte for byte, across
// chunks, to its own account only; a body that does not match its size or
// hash is refused and leaves no row and no chunk; a second put of the
// same bytes keeps one copy; deletes honour the time they are given.
func uploads(t *testing.T, s store.Store) {
	u, ok := s.(store.Uploads)
	if !ok {
		t.Fatalf("%T does not keep uploads (store.Uploads)", s)
	}
	// Two and a half chunks, so that both full and partial rows are read.
	big := make([]byte, 2*store.UploadChunkBytes+store.UploadChunkBytes/2)
	rand.NewChaCha8([32]byte{1}).Read(big)
	sum := hashOf(big)
	before := time.Now()
	up, err := u.PutUpload(ctx, "A", sum, int64(len(big)), bytes.NewReader(big), nil)
	must(t, err)
	if up.SHA256 != sum || up.SizeBytes != int64(len(big)) || up.Account != "A" || up.CreatedAt.Before(before.Add(-time.Second)) {
		t.Errorf("PutUpload = %+v", up)
	}
	if up.URI() != "kiln-upload://A/"+sum+".zip" {
		t.Errorf("URI = %s", up.URI())
	}
	if got := readUpload(t, u, "A", sum); !bytes.Equal(got, big) {
		t.Fatalf("read back %d bytes (hash %s), want %d (hash %s)", len(got), hashOf(got), len(big), sum)
	}
	// Account scoping: B knows the hash but has no such upload.
	_, _, err = u.OpenUpload(ctx, "B", sum)
	is(t, err, errdefs.ErrNotFound)
	is(t, u.TouchUpload(ctx, "B", sum, time.Now()), errdefs.ErrNotFound)
	if ok, err := u.DeleteUpload(ctx, "B", sum, time.Now().Add(time.Hour)); err != nil || ok {
		t.Errorf("B deleted A's upload: %v %v", ok, err)
	}

	// Refusals leave nothing: wrong hash, short body, long body.
	small := []byte("PK\x03\x04 small package")
	wrong := hashOf([]byte("other"))
	for _, tc := range []struct {
		name string
		sha  string
		size int64
		body []byte
	}{
		{"wrong hash", wrong, int64(len(big)), big},
		{"short body", hashOf(small), int64(len(small)) + 1, small},
		{"long body", "", int64(len(small)) - 1, small},
	} {
		_, err := u.PutUpload(ctx, "C", tc.sha, tc.size, bytes.NewReader(tc.body), nil)
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: PutUpload = %v, want ErrInvalid", tc.name, err)
		}
	}
	if l, _ := u.ListUploads(ctx, "C"); len(l) != 0 {
		t.Errorf("refused puts left uploads: %+v", l)
	}
	if n, err := u.PruneUploadChunks(ctx, time.Now().Add(time.Hour)); err != nil || n != 0 {
		t.Errorf("refused puts left %d chunks (%v)", n, err)
	}

	// No declared hash: the store computes it. Again: one copy, newer time.
	up2, err := u.PutUpload(ctx, "B", "", int64(len(small)), bytes.NewReader(small), nil)
	must(t, err)
	if up2.SHA256 != hashOf(small) {
		t.Errorf("computed hash %s, want %s", up2.SHA256, hashOf(small))
	}
	time.Sleep(time.Millisecond)
	up3, err := u.PutUpload(ctx, "B", up2.SHA256, int64(len(small)), bytes.NewReader(small), nil)
	must(t, err)
	if !up3.CreatedAt.After(up2.CreatedAt) {
		t.Errorf("a second put kept created at %v (first %v)", up3.CreatedAt, up2.CreatedAt)
	}
	if n, _ := u.PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("a second put of the same bytes left %d stray chunks", n)
	}
	if got := readUpload(t, u, "B", up2.SHA256); !bytes.Equal(got, small) {
		t.Errorf("B's upload reads %q", got)
	}

	all, err := u.ListUploads(ctx, "")
	must(t, err)
	if len(all) != 2 || all[0].Account != "A" || all[1].Account != "B" || all[0].SizeBytes != int64(len(big)) {
		t.Errorf("ListUploads(all) = %+v", all)
	}
	onlyB, err := u.ListUploads(ctx, "B")
	must(t, err)
	if len(onlyB) != 1 || onlyB[0].SHA256 != up2.SHA256 {
		t.Errorf("ListUploads(B) = %+v", onlyB)
	}

	// Deletes: not while younger than the given time; touching renews.
	if ok, err := u.DeleteUpload(ctx, "A", sum, before.Add(-time.Minute)); err != nil || ok {
		t.Errorf("deleted an upload newer than the cut-off: %v %v", ok, err)
	}
	must(t, u.TouchUpload(ctx, "A", sum, time.Now().Add(time.Minute)))
	if ok, _ := u.DeleteUpload(ctx, "A", sum, time.Now()); ok {
		t.Error("deleted an upload touched after the cut-off")
	}
	rc, _, err := u.OpenUpload(ctx, "A", sum)
	must(t, err)
	defer rc.Close()
	if ok, err := u.DeleteUpload(ctx, "A", sum, time.Now().Add(time.Hour)); err != nil || !ok {
		t.Fatalf("DeleteUpload = %v, %v", ok, err)
	}
	// A reader opened before the delete fails rather than reading short.
	if _, err := io.ReadAll(rc); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("reading a deleted upload: %v, want io.ErrUnexpectedEOF", err)
	}
	_, _, err = u.OpenUpload(ctx, "A", sum)
	is(t, err, errdefs.ErrNotFound)
	if n, _ := u.PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("a delete left %d chunks", n)
	}
}

// uploadQuota: puts with an admission that each fit alone do not pass the
// StorageBytes quota together (the cluster's control replicas each take
// some), a refused one leaves no chunk, and QuotaUsage counts the uploads.
func uploadQuota(t *testing.T, s store.Store) {
	u := s.(store.Uploads)
	adm := store.Admission{Defaults: store.Quota{Microvms: -1, MemoryMiB: -1, VCPUs: -1, Builds: -1, StorageBytes: 250}}
	body := func(i int) []byte { return bytes.Repeat([]byte{byte(i)}, 100) }
	ok := race(t, []store.Store{s}, func(qe *store.QuotaError) {
		if qe.Quota != store.QuotaStorageBytes || qe.Requested != 100 {
			t.Errorf("QuotaError = %+v", qe)
		}
	}, func(_ store.Store, i int) error {
		_, err := u.PutUpload(ctx, "A", "", 100, bytes.NewReader(body(i)), &adm)
		return err
	})
	q, err := s.QuotaUsage(ctx, "A")
	must(t, err)
	if ok != 2 || q.StorageBytes != 200 {
		t.Errorf("%d puts of 100 bytes passed a quota of 250, usage %d bytes; want 2 and 200", ok, q.StorageBytes)
	}
	if n, _ := u.PruneUploadChunks(ctx, time.Now().Add(time.Hour)); n != 0 {
		t.Errorf("refused puts left %d chunks", n)
	}
	// A package the account has needs no room, even at the limit.
	ups, err := u.ListUploads(ctx, "A")
	must(t, err)
	for i := range 20 {
		if len(ups) > 0 && hashOf(body(i)) == ups[0].SHA256 {
			_, err := u.PutUpload(ctx, "A", "", 100, bytes.NewReader(body(i)), &adm)
			must(t, err)
		}
	}
}
