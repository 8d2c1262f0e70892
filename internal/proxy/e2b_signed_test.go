package proxy

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestE2BSignedURL: a request for envd's port without X-Access-Token gets
// through only when it carries a signature that Envd.Signed accepts for
// that sandbox and account (E2B's signed /files URLs); before Signed
// existed every such request was 401.
func TestE2BSignedURL(t *testing.T) {
	e := newEnvWith(t, func(c *Config) {
		c.Envd = &Envd{Port: 49983,
			Handler:   http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "envd "+MicrovmID(r.Context())) }),
			Authorize: func(tok, id, account string) bool { return false },
			Signed: func(r *http.Request, id, account string) error {
				if r.URL.Query().Get("signature") == "good-"+id+"-"+account {
					return nil
				}
				return errors.New("bad signature")
			}}
	})
	for _, tc := range []struct {
		name, query string
		status      int
	}{
		{"good signature", "?path=/a&signature=good-vm1-acct", 200},
		{"other sandbox's signature", "?path=/a&signature=good-vm2-acct", 401},
		{"no signature", "?path=/a", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.client.Get("https://49983-vm1." + domain + "/files" + tc.query)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, tc.status)
			}
			if tc.status == 200 && !strings.Contains(string(body), "envd vm1") {
				t.Fatalf("answered %q", body)
			}
		})
	}
}
