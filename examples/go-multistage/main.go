// Command server is kiln's multi-stage Go example: an HTTP server that
// reports when it started, so a microVM restored from the image's snapshot
// shows the build's start time rather than its own.
package main

import (
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"os"
	"sync/atomic"
	"time"
)

var (
	startedAt = time.Now()
	requests  atomic.Int64
)

func main() {
	addr := flag.String("addr", ":8080", "listen address")
	flag.Parse()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{
			"app":       "go-multistage",
			"startedAt": float64(startedAt.UnixNano()) / 1e9,
			"now":       float64(time.Now().UnixNano()) / 1e9,
			"pid":       os.Getpid(),
			"hostname":  host,
			"requests":  requests.Add(1),
		})
	})
	log.Printf("go-multistage listening on %s", *addr)
	srv := &http.Server{Addr: *addr, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
