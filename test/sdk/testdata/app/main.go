// Command app is the guest app of the SDK end-to-end test, built
// statically into a FROM scratch image. On :8080 it says hello with
// $GREETING and $VERSION (so a request shows which image version and which
// environment it runs with), counts requests in memory (suspend and resume
// must keep the count) and shows the run hook's payload; on :9000 it
// serves the lifecycle hooks. /size shows the vCPUs and memory.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
)

func main() {
	var mu sync.Mutex
	count := 0
	payload := ""
	var hooks []string
	app := http.NewServeMux()
	app.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s from v%s", os.Getenv("GREETING"), os.Getenv("VERSION"))
	})
	app.HandleFunc("GET /count", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		count++
		n := count
		mu.Unlock()
		fmt.Fprintf(w, "count=%d", n)
	})
	app.HandleFunc("GET /payload", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprint(w, payload)
	})
	// /size shows the vCPUs and memory the microVM has (the image's
	// resources decide them).
	app.HandleFunc("GET /size", func(w http.ResponseWriter, r *http.Request) {
		mem := "?"
		if b, err := os.ReadFile("/proc/meminfo"); err == nil {
			if f := strings.Fields(string(b)); len(f) > 1 {
				mem = f[1]
			}
		}
		fmt.Fprintf(w, "cpus=%d memkb=%s", runtime.NumCPU(), mem)
	})
	app.HandleFunc("GET /hooks", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprint(w, strings.Join(hooks, ","))
	})
	hookMux := http.NewServeMux()
	hookMux.HandleFunc("POST /aws/lambda-microvms/runtime/v1/{hook}", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		mu.Lock()
		defer mu.Unlock()
		hooks = append(hooks, r.PathValue("hook"))
		if r.PathValue("hook") == "run" {
			payload = string(b)
		}
	})
	go func() {
		if err := http.ListenAndServe(":9000", hookMux); err != nil {
			panic(err)
		}
	}()
	fmt.Println("sdk test app listening")
	if err := http.ListenAndServe(":8080", app); err != nil {
		panic(err)
	}
}
