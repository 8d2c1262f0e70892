package qmp

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// FuzzConn plays a QEMU that sends data on its QMP socket (a compromised
// QEMU writes what it likes): Dial and a command always return within
// their deadline, with an error or a result, and never panic.
func FuzzConn(f *testing.F) {
	greeting := `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}}` + "\n"
	f.Add([]byte(greeting + `{"return": {}, "id": 1}` + "\n" + `{"return": {"status": "running"}, "id": 2}` + "\n"))
	f.Add([]byte(greeting + `{"error": {"class": "GenericError", "desc": "no"}, "id": 1}` + "\n"))
	f.Add([]byte(greeting + `{"event": "STOP", "data": {}}` + "\n" + `{"return": {}, "id": 1}` + "\n"))
	f.Add([]byte(greeting + `{"return": {}, "id": 7}` + "\n"))
	f.Add([]byte(`{"QMP": null}` + "\n"))
	f.Add([]byte("not json\n"))
	f.Add([]byte(greeting + `{"return": {}, "id": 1}` + "\n" + `{"return": [1,2,3], "id": 2}` + "\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "qmp.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			c.Write(data)
			// Hold the connection open a little, as a live QEMU would, so
			// the client's deadline (not an EOF) ends a wait.
			time.Sleep(50 * time.Millisecond)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		q, err := Dial(ctx, path)
		if err == nil {
			var status struct {
				Status string `json:"status"`
			}
			q.Execute(ctx, "query-status", nil, &status)
			q.Close()
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("took %s past a 500 ms deadline", took)
		}
	})
}
