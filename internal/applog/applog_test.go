package applog

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func readAll(t testing.TB, m *Manager, id string, off int64) ([]byte, int64) {
	t.Helper()
	var out []byte
	for {
		b, next, err := m.Read(id, off, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 {
			return out, next
		}
		if next-int64(len(b)) < off {
			t.Fatalf("next %d after %d bytes from %d", next, len(b), off)
		}
		out, off = append(out, b...), next
	}
}

func diskBytes(t *testing.T, dir string) (total int64, files int) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		info, _ := e.Info()
		if strings.HasSuffix(e.Name(), segSuffix) {
			total += info.Size()
			files++
			if info.Mode().Perm() != 0o600 {
				t.Errorf("%s is %v, want 0600", e.Name(), info.Mode().Perm())
			}
		}
	}
	return total, files
}

// The log keeps the newest bytes within the cap, rotates through its
// segments with offsets that stay valid, and continues after a reopen (a
// kiln restart) at the same offsets.
func TestRotateCapAndReopen(t *testing.T) {
	root := filepath.Join(t.TempDir(), "logs")
	m, err := New(root, Options{MaxBytes: 4000, Segments: 4})
	if err != nil {
		t.Fatal(err)
	}
	w, err := m.Open("mvm-a")
	if err != nil {
		t.Fatal(err)
	}
	var all bytes.Buffer
	for i := range 500 {
		line := fmt.Sprintf("line %04d\n", i) // 10 bytes
		all.WriteString(line)
		w.Write([]byte(line))
		if i%50 == 0 {
			w.Sync()
		}
	}
	w.Sync()
	total, files := diskBytes(t, m.Dir("mvm-a"))
	if total > 4000 || files > 4 {
		t.Fatalf("log holds %d bytes in %d files, cap 4000 in 4", total, files)
	}
	got, end := readAll(t, m, "mvm-a", 0)
	if end != int64(all.Len()) {
		t.Fatalf("end offset %d, want %d", end, all.Len())
	}
	if !bytes.HasSuffix(all.Bytes(), got) || len(got) < 3000 {
		t.Fatalf("kept %d bytes that are not the newest: %q", len(got), got[:min(len(got), 40)])
	}
	for _, d := range []string{root, m.Dir("mvm-a")} {
		if st, _ := os.Stat(d); st.Mode().Perm() != 0o700 {
			t.Errorf("%s is %v, want 0700", d, st.Mode().Perm())
		}
	}

	// A restart: the Manager is new, the offsets go on.
	m.CloseAll()
	m2, err := New(root, Options{MaxBytes: 4000, Segments: 4})
	if err != nil {
		t.Fatal(err)
	}
	w2, _ := m2.Open("mvm-a")
	w2.Write([]byte("after restart\n"))
	w2.Sync()
	b, next := readAll(t, m2, "mvm-a", end)
	if string(b) != "after restart\n" || next != end+14 {
		t.Fatalf("after reopen read %q up to %d, want the new line up to %d", b, next, end+14)
	}
	// An offset older than what is kept starts at the oldest byte.
	b, _, _ = m2.Read("mvm-a", 0, 10)
	if len(b) != 10 {
		t.Fatalf("read from 0 gave %q", b)
	}
}

// A writer that outpaces the disk neither blocks nor grows: the excess is
// dropped and the log says how much.
func TestFloodIsBoundedAndCounted(t *testing.T) {
	m, err := New(filepath.Join(t.TempDir(), "logs"), Options{MaxBytes: 64 << 10, Segments: 4, Buffer: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	w, _ := m.Open("mvm-flood")
	chunk := bytes.Repeat([]byte("y\n"), 32<<10) // 64 KiB
	start := time.Now()
	for range 200 { // 12.5 MiB
		w.Write(chunk)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("200 writes of 64 KiB took %v: writes must not wait for the disk", d)
	}
	w.Sync()
	total, files := diskBytes(t, m.Dir("mvm-flood"))
	if total > 64<<10 || files > 4 {
		t.Fatalf("flood left %d bytes in %d files, cap %d", total, files, 64<<10)
	}
	got, _ := readAll(t, m, "mvm-flood", 0)
	if !bytes.Contains(got, []byte("bytes of output dropped")) {
		t.Fatalf("no dropped-bytes line in the log's tail")
	}
}

// An ended log stays for the retention period, then Sweep removes it;
// an open one is never swept; Remove keeps nothing.
func TestSweepAndRemove(t *testing.T) {
	m, err := New(filepath.Join(t.TempDir(), "logs"), Options{Retention: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"mvm-ended", "mvm-live", "mvm-gone"} {
		w, _ := m.Open(id)
		w.Write([]byte("hello\n"))
		w.Sync()
	}
	m.Close("mvm-ended")
	m.Remove("mvm-gone")
	if m.Exists("mvm-gone") {
		t.Fatal("Remove left the log")
	}
	if got, _ := m.Sweep(time.Now().Add(30 * time.Minute)); len(got) != 0 {
		t.Fatalf("swept %v within the retention period", got)
	}
	if b, _ := readAll(t, m, "mvm-ended", 0); string(b) != "hello\n" {
		t.Fatalf("ended log reads %q", b)
	}
	got, err := m.Sweep(time.Now().Add(2 * time.Hour))
	if err != nil || len(got) != 1 || got[0] != "mvm-ended" {
		t.Fatalf("Sweep after retention removed %v, %v; want only mvm-ended", got, err)
	}
	if m.Exists("mvm-ended") || !m.Exists("mvm-live") {
		t.Fatal("sweep removed the wrong logs")
	}
	if _, err := m.Open("../x"); err == nil {
		t.Fatal("Open accepted a path as id")
	}
}

// FuzzRead: any offset and limit a client sends reads within the log and
// returns a consistent next offset.
func FuzzRead(f *testing.F) {
	dir := f.TempDir()
	m, err := New(filepath.Join(dir, "logs"), Options{MaxBytes: 400, Segments: 4})
	if err != nil {
		f.Fatal(err)
	}
	w, _ := m.Open("mvm-f")
	for i := range 100 {
		fmt.Fprintf(w, "%04d\n", i)
		w.Sync()
	}
	f.Add(int64(0), 10)
	f.Add(int64(-5), 1000)
	f.Add(int64(499), 1)
	f.Add(int64(1<<62), 5)
	f.Fuzz(func(t *testing.T, off int64, limit int) {
		if off < 0 {
			off = 0 // the API refuses negative offsets
		}
		b, next, err := m.Read("mvm-f", off, limit)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > max(limit, 0) || next < 0 || (len(b) > 0 && next < off) || next > 500 && len(b) > 0 {
			t.Fatalf("Read(%d, %d) = %d bytes, next %d", off, limit, len(b), next)
		}
	})
}
