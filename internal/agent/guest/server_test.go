//go:build linux

package guest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// scriptReader returns its chunks in turn; a nil chunk yields ErrReconnect.
type scriptReader struct{ chunks [][]byte }

func (s *scriptReader) Read(p []byte) (int, error) {
	if len(s.chunks) == 0 {
		return 0, io.EOF
	}
	c := s.chunks[0]
	if c == nil {
		s.chunks = s.chunks[1:]
		return 0, ErrReconnect
	}
	n := copy(p, c)
	if n == len(c) {
		s.chunks = s.chunks[1:]
	} else {
		s.chunks[0] = c[n:]
	}
	return n, nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) messages(t *testing.T) []proto.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := proto.NewReader(bytes.NewReader(s.b.Bytes()))
	var out []proto.Message
	for {
		p, err := r.ReadFrame()
		if err != nil {
			return out
		}
		m, err := proto.Decode(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
}

func req(t *testing.T, typ proto.Type, id uint64, body any) []byte {
	t.Helper()
	p, err := proto.Encode(typ, id, "", body)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := proto.AppendFrame(nil, p)
	return f
}

func TestServeResync(t *testing.T) {
	hello := func(id uint64, v int) []byte {
		return req(t, proto.TypeHello, id, proto.Hello{Version: v, Nonce: "n"})
	}
	ping := req(t, proto.TypePing, 2, nil)
	bigPartial := req(t, proto.TypePing, 50, map[string]string{"pad": string(bytes.Repeat([]byte("p"), 5000))})[:100]
	tests := []struct {
		name      string
		chunks    [][]byte
		wantIDs   []uint64 // ids of responses, in order
		wantError map[uint64]bool
	}{
		{name: "clean session", chunks: [][]byte{hello(1, proto.Version), ping}, wantIDs: []uint64{1, 2}},
		{name: "garbage before hello", chunks: [][]byte{[]byte("old bytes"), hello(1, proto.Version), ping}, wantIDs: []uint64{1, 2}},
		{name: "half frame then reconnect", chunks: [][]byte{bigPartial, nil, hello(1, proto.Version), ping}, wantIDs: []uint64{1, 2}},
		{name: "version mismatch", chunks: [][]byte{hello(1, proto.Version+1)}, wantIDs: []uint64{1}, wantError: map[uint64]bool{1: true}},
		{name: "unknown request", chunks: [][]byte{hello(1, proto.Version), req(t, "bogus", 9, nil)}, wantIDs: []uint64{1, 9}, wantError: map[uint64]bool{9: true}},
		{name: "bad body", chunks: [][]byte{hello(1, proto.Version), req(t, proto.TypeExec, 4, "not an object")}, wantIDs: []uint64{1, 4}, wantError: map[uint64]bool{4: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewServer(Config{})
			var out syncBuffer
			done := make(chan error, 1)
			go func() { done <- s.Serve(context.Background(), &scriptReader{chunks: tt.chunks}, &out) }()
			if err := <-done; !errors.Is(err, io.EOF) {
				t.Fatalf("Serve: %v", err)
			}
			// Serve returned at EOF; handlers may still be answering: let
			// them finish, then drain the outbox.
			s.handlers.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			s.writeLoop(ctx, &out)
			cancel()
			msgs := out.messages(t)
			var ids []uint64
			for _, m := range msgs {
				if m.Type != proto.TypeResponse {
					continue
				}
				ids = append(ids, m.ID)
				if (m.Error != "") != tt.wantError[m.ID] {
					t.Errorf("response %d error %q, want error=%v", m.ID, m.Error, tt.wantError[m.ID])
				}
			}
			if len(ids) != len(tt.wantIDs) {
				t.Fatalf("responses %v, want %v", ids, tt.wantIDs)
			}
			for i := range ids {
				if ids[i] != tt.wantIDs[i] {
					t.Fatalf("responses %v, want %v", ids, tt.wantIDs)
				}
			}
		})
	}
}

func TestOutboxDropsOldest(t *testing.T) {
	o := newOutbox(100)
	s := o.stream(1, false)
	for range 10 {
		o.output(s, proto.Stdout, bytes.Repeat([]byte("a"), 30))
	}
	o.output(s, proto.Stdout, []byte("last"))
	o.exit(s, proto.Exit{ExecID: 1, Code: 3})
	o.close(s)
	var got []proto.Message
	for {
		m, ok := o.pop()
		if !ok {
			break
		}
		msg, err := proto.Decode(m.payload)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, msg)
	}
	var data []byte
	var dropped uint64
	for _, m := range got[:len(got)-1] {
		var out proto.Output
		proto.DecodeBody(m, &out)
		data = append(data, m.Data...)
		dropped += out.Dropped
	}
	if len(data) > 100 || !bytes.HasSuffix(data, []byte("last")) {
		t.Errorf("kept %d bytes ending %q", len(data), data[max(0, len(data)-4):])
	}
	if int(dropped)+len(data) != 304 {
		t.Errorf("dropped %d + kept %d != 304", dropped, len(data))
	}
	if last := got[len(got)-1]; last.Type != proto.TypeExit {
		t.Errorf("last message %s, want exit after all output", last.Type)
	}
	if len(o.streams) != 0 {
		t.Errorf("%d streams left", len(o.streams))
	}
}

func TestLookupUser(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root+"/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
	writeFile(t, root+"/etc/group", "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:app\n")
	tests := []struct {
		spec    string
		want    identity
		wantErr bool
	}{
		{spec: "", want: identity{uid: 0, gid: 0, groups: []uint32{0}, home: "/root", name: "root"}},
		{spec: "app", want: identity{uid: 1000, gid: 1000, groups: []uint32{1000, 2000, 10}, home: "/home/app", name: "app"}},
		{spec: "1000", want: identity{uid: 1000, gid: 1000, groups: []uint32{1000, 2000, 10}, home: "/home/app", name: "app"}},
		{spec: "app:extra", want: identity{uid: 1000, gid: 2000, groups: []uint32{2000}, home: "/home/app", name: "app"}},
		{spec: "4242", want: identity{uid: 4242, gid: 0, groups: []uint32{0}, home: "/"}},
		{spec: "4242:77", want: identity{uid: 4242, gid: 77, groups: []uint32{77}, home: "/"}},
		{spec: "ghost", wantErr: true},
		{spec: "app:ghosts", wantErr: true},
	}
	for _, tt := range tests {
		t.Run("spec="+tt.spec, func(t *testing.T) {
			got, err := lookupUser(root, tt.spec)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err %v, wantErr %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if got.uid != tt.want.uid || got.gid != tt.want.gid || got.home != tt.want.home || !equalU32(got.groups, tt.want.groups) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func equalU32(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
