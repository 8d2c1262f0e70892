//go:build linux

package imagebuild

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// TestReadyCommandSilentAgentBounded: an agent that starts the ready
// command and then answers nothing (the kill of a command still running
// included) does not hold the build past its ready deadline.
func TestReadyCommandSilentAgentBounded(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	go func() { // answers hello and exec, then nothing
		r := proto.NewReader(guest)
		execs := 0
		for {
			pl, err := r.ReadFrame()
			if err != nil {
				return
			}
			m, err := proto.Decode(pl)
			if err != nil {
				return
			}
			var body any
			switch m.Type {
			case proto.TypeHello:
				var h proto.Hello
				proto.DecodeBody(m, &h)
				body = proto.HelloResult{Version: proto.Version, Nonce: h.Nonce}
			case proto.TypeExec:
				execs++
				body = proto.ExecResult{ExecID: uint64(execs), Pid: 10 + execs}
			default:
				continue
			}
			p, _ := proto.Encode(proto.TypeResponse, m.ID, "", body)
			fr, _ := proto.AppendFrame(nil, p)
			guest.Write(fr)
		}
	}()
	a, err := client.New(context.Background(), host, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	app, err := a.Exec(context.Background(), client.ExecRequest{Argv: []string{"app"}, Background: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rctx, rcancel := context.WithTimeout(ctx, time.Second)
	defer rcancel()
	done := make(chan error, 1)
	go func() { done <- waitReadyCommand(ctx, rctx, a, app, "sleep 1000", appSpec{}, time.Second, io.Discard) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("ready with a command that never exited")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the ready wait still blocks long after the build's deadline")
	}
}
