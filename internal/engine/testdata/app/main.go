// Command app is the guest app of the engine's tests: it keeps a counter
// in memory (to show that suspend and resume keep the app's state), serves
// a second port (port selection) and records the run hook's payload.
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "probe" {
		// probe ADDR...: try a TCP connection to each (isolation tests).
		var wg sync.WaitGroup
		for _, a := range os.Args[2:] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.DialTimeout("tcp", a, 3*time.Second)
				if err != nil {
					fmt.Printf("blocked %s\n", a)
					return
				}
				c.Close()
				fmt.Printf("reached %s\n", a)
			}()
		}
		wg.Wait()
		return
	}
	var mu sync.Mutex
	count := 0
	payload := ""
	hooks := []string{}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /count", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		count++
		n := count
		mu.Unlock()
		fmt.Fprintf(w, "count=%d", n)
		fmt.Printf("served count=%d\n", n) // the engine keeps the app's output
	})
	mux.HandleFunc("GET /flood", func(w http.ResponseWriter, r *http.Request) {
		// Prints ?kib= KiB to stdout as fast as it can (log cap tests).
		n, _ := strconv.Atoi(r.URL.Query().Get("kib"))
		line := []byte(strings.Repeat("y", 1023) + "\n")
		for range n {
			os.Stdout.Write(line)
		}
		fmt.Fprintf(w, "flooded %d KiB", n)
	})
	mux.HandleFunc("GET /payload", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprint(w, payload)
	})
	mux.HandleFunc("GET /hooks", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprint(w, hooks)
	})
	mux.HandleFunc("POST /aws/lambda-microvms/runtime/v1/{hook}", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		mu.Lock()
		defer mu.Unlock()
		hooks = append(hooks, r.PathValue("hook"))
		if r.PathValue("hook") == "run" {
			payload = string(b)
		}
	})
	go http.ListenAndServe(":8081", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "port 8081")
	}))
	if err := http.ListenAndServe(":8080", mux); err != nil {
		panic(err)
	}
}
