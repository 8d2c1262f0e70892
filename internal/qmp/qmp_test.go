package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestLateReplyDoesNotCostTheNext: a reply that comes after its command
// timed out is dropped, whether it arrives before the next command is
// sent or just before that command's own reply; the next command gets
// its answer.
func TestLateReplyDoesNotCostTheNext(t *testing.T) {
	for _, lateBefore := range []bool{true, false} {
		path := filepath.Join(t.TempDir(), "qmp.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		late := make(chan struct{})
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			r := bufio.NewReader(c)
			next := func() (id int) {
				line, err := r.ReadBytes('\n')
				var m struct{ ID int }
				if err == nil {
					json.Unmarshal(line, &m)
				}
				return m.ID
			}
			reply := func(id int) {
				c.Write([]byte(`{"return": {"status": "running"}, "id": ` + string(rune('0'+id)) + "}\n"))
			}
			c.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\n"))
			reply(next()) // qmp_capabilities
			a := next()   // A: answered only once its caller gave up
			<-late
			if lateBefore {
				reply(a)
				time.Sleep(50 * time.Millisecond) // in the slot before B is sent
				reply(next())
			} else {
				b := next()
				c.Write([]byte(`{"return": {}, "id": ` + string(rune('0'+a)) + "}\n" + `{"return": {"status": "running"}, "id": ` + string(rune('0'+b)) + "}\n"))
			}
			time.Sleep(2 * time.Second)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		q, err := Dial(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		actx, acancel := context.WithTimeout(ctx, 50*time.Millisecond)
		if err := q.Execute(actx, "stop", nil, nil); err == nil {
			t.Fatal("A answered")
		}
		acancel()
		close(late)
		if lateBefore {
			time.Sleep(25 * time.Millisecond)
		}
		var st struct{ Status string }
		bctx, bcancel := context.WithTimeout(ctx, time.Second)
		if err := q.Execute(bctx, "query-status", nil, &st); err != nil || st.Status != "running" {
			t.Errorf("late reply before B's write %v: B got %+v, %v", lateBefore, st, err)
		}
		bcancel()
		q.Close()
		cancel()
	}
}
