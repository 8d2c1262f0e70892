// Command app is the test app of internal/imagebuild: it records when it
// started and serves that on 8080, so a clone shows whether start-up ran
// again. MODE picks a misbehaviour: exit, never (never listens), hooks
// (serves the ready/validate hooks on HOOKS_PORT: ready after
// READY_AFTER seconds, validate answers VALIDATE_STATUS). "app write FILE
// TEXT" writes TEXT to FILE and exits: a RUN step for roots without a
// shell (FROM scratch).
package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) == 4 && os.Args[1] == "write" {
		if err := os.WriteFile(os.Args[2], []byte(os.Args[3]), 0o644); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("test app wrote", os.Args[2])
		return
	}
	started := time.Now()
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
		mux.HandleFunc("POST /aws/lambda-microvms/runtime/v1/validate", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(vstatus)
			fmt.Fprintln(w, "validate says", vstatus)
		})
		go http.ListenAndServe(":"+os.Getenv("HOOKS_PORT"), mux)
	}
	marker, _ := os.ReadFile("/etc/built-marker")
	wd, _ := os.Getwd()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		json.NewEncoder(w).Encode(map[string]any{
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
