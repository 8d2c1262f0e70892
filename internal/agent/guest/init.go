//go:build linux

package guest

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// RunInit is kiln-agent's main when it is PID 1 in a guest. It never
// returns: PID 1 exiting panics the kernel.
func RunInit() {
	// Catch (not ignore) the signals whose Go default is to exit: an ignored
	// disposition would be inherited by every workload across execve.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE)
	level := new(slog.LevelVar)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "kiln-agent")
	go func() {
		for s := range sigs {
			log.Debug("ignoring signal", "signal", s)
		}
	}()
	start := time.Now()
	res := Boot(log, level)
	log.Info("booted", append([]any{"switched_root", res.SwitchedRoot, "elapsed", time.Since(start)}, res.Steps...)...)

	var sys System
	if res.CgroupDir != "" {
		sys = &LinuxSystem{CgroupDir: res.CgroupDir, Log: log}
	}
	srv := NewServer(Config{Root: "/", CgroupDir: res.CgroupDir, System: sys, Log: log, RootDisk: res.RootDisk})
	ctx := context.Background()
	go srv.Reap(ctx)

	for {
		path, err := FindPort(PortName)
		if err == nil {
			var port *Port
			if port, err = OpenPort(path, log); err == nil {
				log.Info("serving", "port", path)
				err = srv.Serve(ctx, port, port)
				port.Close()
			}
		}
		log.Error("agent channel failed, retrying", "err", err)
		time.Sleep(500 * time.Millisecond)
	}
}
