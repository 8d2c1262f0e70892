// Command app is the guest app of the SDK end-to-end test, built
// statically into a FROM scratch image. On :8080 it says hello with
// $GREETING and $VERSION (so a request shows which image version and which
// environment it runs with), counts requests in memory (suspend and resume
// must keep the count) and shows the run hook's payload; on :9000 it
// serves the lifecycle hooks. /size shows the vCPUs and memory. GET /imds
// follows the IMDSv2 flow against 169.254.169.254 and reports what the
// metadata service answered. `app say WORDS` prints WORDS and exits 3.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// imdsReport is what GET /imds answers: the status of an IMDSv1-style
// GET (no token), of the role listing, and the role's credentials.
type imdsReport struct {
	V1Status   int
	ListStatus int
	Role       string
	Creds      map[string]string
	Err        string `json:",omitempty"`
}

func imdsFlow() (rep imdsReport) {
	const base = "http://169.254.169.254"
	c := &http.Client{Timeout: 5 * time.Second}
	do := func(method, path string, hdr map[string]string) (int, []byte, error) {
		req, err := http.NewRequest(method, base+path, nil)
		if err != nil {
			return 0, nil, err
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		res, err := c.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer res.Body.Close()
		b, err := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		return res.StatusCode, b, err
	}
	var err error
	defer func() {
		if err != nil {
			rep.Err = err.Error()
		}
	}()
	if rep.V1Status, _, err = do("GET", "/latest/meta-data/iam/security-credentials/", nil); err != nil {
		return
	}
	code, tok, err := do("PUT", "/latest/api/token", map[string]string{"X-aws-ec2-metadata-token-ttl-seconds": "60"})
	if err != nil {
		return
	}
	if code != 200 {
		err = fmt.Errorf("PUT token: %d", code)
		return
	}
	auth := map[string]string{"X-aws-ec2-metadata-token": string(tok)}
	code, role, err := do("GET", "/latest/meta-data/iam/security-credentials/", auth)
	rep.ListStatus = code
	if err != nil || code != 200 {
		return
	}
	rep.Role = string(role)
	_, b, err := do("GET", "/latest/meta-data/iam/security-credentials/"+rep.Role, auth)
	if err == nil {
		err = json.Unmarshal(b, &rep.Creds)
	}
	return
}

func main() {
	// `app say WORDS...` prints them and exits 3: a command for `kiln exec`
	// in an image that has no shell.
	if len(os.Args) > 1 && os.Args[1] == "say" {
		fmt.Println(strings.Join(os.Args[2:], " "))
		os.Exit(3)
	}
	var mu sync.Mutex
	count := 0
	payload := ""
	var hooks []string
	app := http.NewServeMux()
	app.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s from v%s", os.Getenv("GREETING"), os.Getenv("VERSION"))
	})
	app.HandleFunc("GET /imds", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(imdsFlow())
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
