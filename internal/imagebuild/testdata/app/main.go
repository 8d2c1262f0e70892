// Command app is the test app of internal/imagebuild: it records when it
// started and serves that on 8080, so a clone shows whether start-up ran
// again. MODE picks a misbehaviour: exit, never (never listens), hooks
// (serves the ready/validate hooks on HOOKS_PORT: ready after
// READY_AFTER seconds, validate answers VALIDATE_STATUS). "app write FILE
// TEXT" writes TEXT to FILE and exits: a RUN step for roots without a
// shell (FROM scratch). "app caps" prints what this process may do
// (mount, raw socket, its capability sets) as JSON; "/" reports that of
// the app and of a child it starts. VALIDATE_503 makes validate answer
// 503 that many times first, and VALIDATE_RESTORED=1 makes it answer 500
// unless it runs on a VM restored from the snapshot (another hostname
// than at start). Capabilities are probed at start.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// caps reports what this process may do.
func caps() map[string]any {
	m := map[string]any{}
	dir, err := os.MkdirTemp("", "mnt")
	if err != nil { // FROM scratch has no /tmp
		dir, _ = os.MkdirTemp("/", "mnt")
	}
	defer os.Remove(dir)
	if err := syscall.Mount("none", dir, "tmpfs", 0, ""); err != nil {
		m["mount"] = err.Error()
	} else {
		m["mount"] = "ok"
		syscall.Unmount(dir, 0)
	}
	if fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_ICMP); err != nil {
		m["rawSocket"] = err.Error()
	} else {
		m["rawSocket"] = "ok"
		syscall.Close(fd)
	}
	if f, err := os.Open("/proc/self/status"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.HasPrefix(k, "Cap") {
				m[k] = strings.TrimSpace(v)
			}
		}
		f.Close()
	}
	return m
}

func main() {
	if len(os.Args) == 4 && os.Args[1] == "write" {
		if err := os.WriteFile(os.Args[2], []byte(os.Args[3]), 0o644); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("test app wrote", os.Args[2])
		return
	}
	if len(os.Args) == 2 && os.Args[1] == "caps" {
		json.NewEncoder(os.Stdout).Encode(caps())
		return
	}
	started := time.Now()
	startHost, _ := os.Hostname()
	mode := os.Getenv("MODE")
	fmt.Println("test app starting, mode", mode)
	switch mode {
	case "exit":
		fmt.Println("test app giving up")
		os.Exit(3)
	case "never":
		for {
			time.Sleep(time.Hour)
		}
	case "hooks":
		after, _ := strconv.ParseFloat(os.Getenv("READY_AFTER"), 64)
		vstatus, _ := strconv.Atoi(os.Getenv("VALIDATE_STATUS"))
		if vstatus == 0 {
			vstatus = 200
		}
		mux := http.NewServeMux()
		mux.HandleFunc("POST /aws/lambda-microvms/runtime/v1/ready", func(w http.ResponseWriter, r *http.Request) {
			if time.Since(started).Seconds() < after {
				w.WriteHeader(503)
				return
			}
			fmt.Fprintln(w, "ready")
		})
		not503, _ := strconv.Atoi(os.Getenv("VALIDATE_503"))
		var calls atomic.Int64
		mux.HandleFunc("POST /aws/lambda-microvms/runtime/v1/validate", func(w http.ResponseWriter, r *http.Request) {
			if n := calls.Add(1); n <= int64(not503) {
				w.WriteHeader(503)
				fmt.Fprintln(w, "not yet", n)
				return
			}
			if host, _ := os.Hostname(); os.Getenv("VALIDATE_RESTORED") == "1" && host == startHost {
				w.WriteHeader(500)
				fmt.Fprintln(w, "validate runs on the VM that started the app, not on a restored one:", host)
				return
			}
			w.WriteHeader(vstatus)
			fmt.Fprintln(w, "validate says", vstatus)
		})
		go http.ListenAndServe(":"+os.Getenv("HOOKS_PORT"), mux)
	}
	// Probed once, beside start-up rather than in the way of the hooks
	// and the listener (an exec is slow under TCG): what the app and a
	// child of it may do. "/" waits for it.
	var ownCaps, childCaps map[string]any
	capsDone := make(chan struct{})
	go func() {
		defer close(capsDone)
		ownCaps = caps()
		if self, err := os.Executable(); err == nil {
			if out, err := exec.Command(self, "caps").Output(); err == nil {
				json.Unmarshal(out, &childCaps)
			}
		}
	}()
	marker, _ := os.ReadFile("/etc/built-marker")
	wd, _ := os.Getwd()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		<-capsDone
		json.NewEncoder(w).Encode(map[string]any{
			"caps":      ownCaps,
			"childCaps": childCaps,
			"startedAt": started.UnixNano(),
			"hostname":  host,
			"greeting":  os.Getenv("GREETING"),
			"extra":     os.Getenv("EXTRA"),
			"uid":       os.Getuid(),
			"cwd":       wd,
			"marker":    string(marker),
		})
	})
	fmt.Println("test app listening on :8080")
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
}
