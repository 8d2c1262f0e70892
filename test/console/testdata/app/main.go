// Command app is the guest app of the console's browser test, built
// statically into a FROM scratch image: on :8080 it says hello with
// $GREETING and $VERSION, and it logs every request to stdout so that the
// console's app log has something to stream after a restore.
package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("request %s %s\n", r.Method, r.URL.Path)
		fmt.Fprintf(w, "hello %s from v%s\n", os.Getenv("GREETING"), os.Getenv("VERSION"))
	})
	fmt.Println("console test app listening")
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
