// Command app is the guest of `kiln bench cluster`: the smallest static
// HTTP server on :8080, so that request latency is kiln's proxies and not
// the guest (busybox httpd forks per connection and closes it after each
// request). The bench compiles it with `go build` at run time.
package main

import (
	"log"
	"net/http"
)

func main() {
	body := []byte("hello from the kiln bench app\n")
	log.Fatal(http.ListenAndServe(":8080", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})))
}
